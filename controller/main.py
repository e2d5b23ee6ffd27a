"""Command line of the controller: `python controller.py --help`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from common.aws import Aws
from common.config import Settings
from common.heap import freeze_startup_heap
from controller.loop import Controller
from controller.policy import MODES


def build_parser(defaults: Settings) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python controller.py",
        description="Scale app-tier EC2 instances from 0 to the cap on request-queue depth, and back "
        "to 0 when the work is done. Reads AWS from the environment (AWS_ENDPOINT_URL for the "
        "embedded AWS); every option below also has an environment variable (see README).",
    )
    p.add_argument("--max-instances", type=int, default=defaults.max_instances,
                   help="never more live instances than this (MAX_INSTANCES, default %(default)s)")
    p.add_argument("--poll-interval", type=float, default=defaults.poll_interval_s,
                   help="seconds between observations (POLL_INTERVAL, default %(default)s)")
    p.add_argument("--mode", choices=MODES, default=defaults.scaling_mode,
                   help="backlog: one instance per TARGET messages; latency: target from acceptable "
                   "latency and processing time (SCALING_MODE, default %(default)s)")
    p.add_argument("--target-backlog", type=float, default=defaults.target_backlog_per_instance,
                   help="messages per instance in backlog mode (TARGET_BACKLOG_PER_INSTANCE, "
                   "default %(default)s)")
    p.add_argument("--acceptable-latency", type=float, default=defaults.acceptable_latency_s,
                   help="seconds a request may wait, latency mode (ACCEPTABLE_LATENCY, default %(default)s)")
    p.add_argument("--seconds-per-image", type=float, default=defaults.seconds_per_image,
                   help="processing time per image on one instance, latency mode (SECONDS_PER_IMAGE, "
                   "default %(default)s)")
    p.add_argument("--boot-time", type=float, default=defaults.boot_time_s,
                   help="seconds from launch to serving, latency mode (BOOT_TIME, default %(default)s)")
    p.add_argument("--scale-in-cooldown", type=float, default=defaults.scale_in_cooldown_s,
                   help="scale-in window: the fleet shrinks only to the most instances wanted in the "
                   "last this many seconds (SCALE_IN_COOLDOWN, default %(default)s; a minute or more on AWS)")
    p.add_argument("--dry-run", action="store_true", help="decide and log, but launch or terminate nothing")
    p.add_argument("--once", action="store_true", help="one observe-decide-act round, then exit")
    p.add_argument("--timeline", type=Path, help="write time, visible, in-flight, pending, running to CSV")
    p.add_argument("--plot", type=Path, help="on exit, draw the timeline CSV as a PNG (needs --timeline)")
    return p


def parse_args(argv: list[str] | None, defaults: Settings) -> argparse.Namespace:
    return build_parser(defaults).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s controller %(message)s")
    defaults = Settings.from_env()
    args = parse_args(argv, defaults)
    if args.plot and not args.timeline:
        print("--plot needs --timeline", file=sys.stderr)
        return 2
    settings = dataclasses.replace(
        defaults,
        max_instances=args.max_instances,
        poll_interval_s=args.poll_interval,
        scaling_mode=args.mode,
        target_backlog_per_instance=args.target_backlog,
        acceptable_latency_s=args.acceptable_latency,
        seconds_per_image=args.seconds_per_image,
        boot_time_s=args.boot_time,
        scale_in_cooldown_s=args.scale_in_cooldown,
    )
    controller = Controller(settings, Aws(settings).open("ec2", "sqs"), dry_run=args.dry_run,
                            timeline_path=args.timeline)
    if args.once:
        controller.step()
    else:
        freeze_startup_heap()
        controller.install_signal_handlers()
        controller.run()
    if args.plot:
        from controller.timeline import plot_timeline

        plot_timeline(args.timeline, args.plot)
    return 0
