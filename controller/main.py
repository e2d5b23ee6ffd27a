"""Command line of the controller: `python controller.py --help`."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from common import cli
from common.aws import Aws
from common.aws_errors import AWS_ERRORS
from common.config import SCALING_MODES, VARIABLE_OF_SETTING, Settings, weights_on_this_host
from common.heap import freeze_startup_heap
from common.logs import configure as configure_logging
from controller.lock import EXIT_ANOTHER_CONTROLLER, AnotherController, hold_fleet_lock
from controller.loop import Controller
from controller.timeline import TIMELINE_FIELDS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SettingOption:
    """An option that sets its setting's environment variable (common/config.py's
    VARIABLES), named in --help, so that options and the environment are checked by one
    parser (Settings.from_env)."""

    flag: str
    setting: str  # the Settings field, whose value --help shows as the default
    help: str
    metavar: str | None = None
    default_note: str = ""  # after the default in --help

    @property
    def variable(self) -> str:
        return VARIABLE_OF_SETTING[self.setting].name

    @property
    def kind(self) -> type:
        return VARIABLE_OF_SETTING[self.setting].kind

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


SETTING_OPTIONS = (
    SettingOption("--max-instances", "max_instances", "never more live instances than this"),
    SettingOption("--poll-interval", "poll_interval_s", "seconds between observations"),
    # Checked by Settings, as SCALING_MODE is (case-insensitive), not by argparse's choices.
    SettingOption("--mode", "scaling_mode",
                  "backlog: one instance per TARGET messages; latency: target from acceptable latency "
                  "and processing time", metavar="{" + ",".join(SCALING_MODES) + "}"),
    SettingOption("--target-backlog", "target_backlog_per_instance", "messages per instance in backlog mode"),
    SettingOption("--acceptable-latency", "acceptable_latency_s", "seconds a request may wait, latency mode"),
    SettingOption("--seconds-per-image", "seconds_per_image",
                  "processing time per image on one instance, latency mode"),
    SettingOption("--boot-time", "boot_time_s", "seconds from launch to serving: latency mode's input, and, "
                  "in both modes, an instance not serving yet counts as booting for twice this",
                  default_note=" here: 90 on AWS, 40 against AWS_ENDPOINT_URL"),
    SettingOption("--scale-in-cooldown", "scale_in_cooldown_s",
                  "scale-in window: the fleet shrinks only to the most instances wanted in the last this "
                  "many seconds", default_note=" here: 60 on AWS, 0 against AWS_ENDPOINT_URL"),
)
OPTION_VARIABLES = {option.dest: option.variable for option in SETTING_OPTIONS}


def build_parser(defaults: Settings) -> argparse.ArgumentParser:
    """The command line; `defaults` are only shown in --help: an option not given is None,
    and leaves its variable's value (settings_from)."""
    p = cli.ArgumentParser(
        prog="python controller.py",
        description="Scale app-tier EC2 instances from 0 to the cap on request-queue depth, and back "
        "to 0 when the work is done. Reads AWS from the environment (AWS_ENDPOINT_URL for the "
        "embedded AWS); every option below also has an environment variable (see README).",
    )
    for option in SETTING_OPTIONS:
        default = getattr(defaults, option.setting)
        p.add_argument(option.flag, type=option.kind, metavar=option.metavar,
                       help=f"{option.help} ({option.variable}, default {default}{option.default_note})")
    p.add_argument("--dry-run", action="store_true", help="decide and log, but launch or terminate nothing")
    p.add_argument("--once", action="store_true", help="one observe-decide-act round, then exit")
    p.add_argument("--timeline", type=Path, metavar="CSV",
                   help=f"write each round's {', '.join(TIMELINE_FIELDS)} to this CSV file")
    p.add_argument("--plot", type=Path, metavar="PNG",
                   help="on exit, draw the timeline CSV as a PNG (needs --timeline)")
    return p


def settings_from(args: argparse.Namespace, env: dict[str, str]) -> Settings:
    """The environment's settings with the options given on top, all checked alike: a
    variable an option replaces is not read (a wrong MAX_INSTANCES must not stop a
    controller started with --max-instances)."""
    options = {var: str(value) for name, var in OPTION_VARIABLES.items()
               if (value := getattr(args, name)) is not None}
    return Settings.from_env({**env, **options})


def naming_the_option(message: str, args: argparse.Namespace) -> str:
    """A setting's error, which names its variable, naming the option too if it was given."""
    for name, variable in OPTION_VARIABLES.items():
        if message.startswith(variable + " ") and getattr(args, name) is not None:
            return f"--{name.replace('_', '-')} ({variable}){message[len(variable):]}"
    return message


def plot_problem(plot: Path, timeline: Path | None) -> str | None:
    """Why --plot could not be drawn at exit, found now: after a run of hours the plot
    would be lost (a missing folder would be a traceback then)."""
    if not timeline:
        return "--plot needs --timeline"
    if importlib.util.find_spec("matplotlib") is None:
        return "--plot needs matplotlib, which `make runtime-venv` leaves out: `make venv` has it"
    if not plot.parent.is_dir():
        return f"--plot {plot}: no folder {plot.parent} to write it in"
    return None


def problems_on_aws(settings: Settings) -> list[str]:
    """What stops a controller that would launch on real AWS (not the embedded one)
    before it starts: each would fail every launch, or every worker, round after round."""
    if settings.endpoint_url is not None:
        return []
    problems = []
    if not settings.instance_profile:
        # Launched without one, a worker has no credentials: it never serves, and its
        # instance is billed until READY_DEADLINE gives up on it.
        problems.append("INSTANCE_PROFILE is not set: on AWS, workers get their credentials from "
                        "their instance profile (ami/README.md, IAM). Set it, or set "
                        "AWS_ENDPOINT_URL to use the embedded AWS.")
    if weights_on_this_host(settings.model_weights):
        # Rendered into each instance's user-data, a path on this host names nothing there:
        # every worker would exit, and be replaced, round after round.
        problems.append(f"MODEL_WEIGHTS={settings.model_weights} is a file on this host, which the "
                        "instances do not have: on AWS use imagenet (baked into the AMI) or an "
                        "s3://bucket/key the workers' role can read.")
    if settings.ami_id == Settings.ami_id:
        # The placeholder names no image: every launch would fail, round after round.
        problems.append(f"AMI_ID is not set (the default {settings.ami_id} is a placeholder): on AWS, "
                        "set it to the image ami/bake.sh printed. Or set AWS_ENDPOINT_URL to use the "
                        "embedded AWS.")
    return problems


def main(argv: list[str] | None = None) -> int:
    configure_logging("%(asctime)s %(levelname)s controller %(message)s")
    try:
        defaults = Settings.from_env()
    except ValueError:  # said below, unless an option replaces the wrong variable
        defaults = Settings()
    parser = build_parser(defaults)
    args = parser.parse_args(argv)
    if args.plot and (problem := plot_problem(args.plot, args.timeline)):
        parser.error(problem)
    try:
        settings = settings_from(args, dict(os.environ))
    except ValueError as exc:
        parser.error(naming_the_option(str(exc), args))
    if not args.dry_run:
        for problem in problems_on_aws(settings):
            parser.error(problem)  # the first: each is enough to stop
    lock = None
    if not args.dry_run and settings.state_dir:
        try:
            lock = hold_fleet_lock(settings)
        except AnotherController as exc:
            print(f"python controller.py: {exc}", file=sys.stderr)
            return EXIT_ANOTHER_CONTROLLER
        except OSError as exc:
            log.warning("no lock against a second controller (%s): run exactly one", exc)
    try:
        return _run(parser, args, settings)
    finally:
        if lock is not None:
            lock.release()


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, settings: Settings) -> int:
    """Build the controller and run it: one round with --once, else until told to stop."""
    try:
        controller = Controller(settings, Aws(settings).open("ec2", "sqs"), dry_run=args.dry_run,
                                timeline_path=args.timeline)
    except ValueError as exc:  # a setting that cannot be passed to instances: names it
        parser.error(str(exc))
    except OSError as exc:  # the timeline's header, written at start: a usage error, not a traceback
        parser.error(f"--timeline {args.timeline}: cannot write it ({exc.strerror or exc})")
    if settings.max_instances == 0:
        log.warning("controller: MAX_INSTANCES is 0: no instance will be launched, and requests "
                    "wait until their RESULT_TIMEOUT")
    if args.once:
        controller.log_settings()
        try:
            controller.step()
        except AWS_ERRORS as exc:  # no credentials, AWS unreachable: one line, not a traceback
            print(f"python controller.py: {exc}", file=sys.stderr)
            return 1
        if controller.launch_backoff.wait_s:  # the round went on (see _act), but a script must know
            print("python controller.py: a launch failed (see the warning above)", file=sys.stderr)
            return 1
    else:
        freeze_startup_heap()
        controller.install_signal_handlers()
        controller.run()
    if args.plot:
        from controller.timeline import plot_timeline

        try:
            plot_timeline(args.timeline, args.plot)
        except (OSError, ValueError) as exc:  # the fleet was managed all the same
            print(f"python controller.py: could not draw {args.plot}: {exc}", file=sys.stderr)
            return 1
    return 0
