"""A worker killed outright: the next worker on its instance shows what it held at once."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
from moto import mock_aws

from app_tier.held_journal import HeldJournal, held_journal_path
from app_tier.worker import Worker
from common.aws import Aws
from common.config import Settings
from common.provision import provision
from tests.conftest import make_image
from tests.unit.test_worker import MeanClassifier, depth, responses, upload


@pytest.fixture
def aws_env(tmp_path):
    with mock_aws():
        # A timeout far past the test: a message seen again came back by the journal.
        settings = dataclasses.replace(Settings(), receive_wait_s=0, visibility_timeout_s=600,
                                       max_receive_count=3, retry_delay_s=0, state_dir=str(tmp_path))
        provision(settings)
        yield settings, Aws(settings)


def test_the_next_worker_on_an_instance_shows_what_a_killed_one_held(aws_env, caplog):
    settings, aws = aws_env
    for i in range(3):
        upload(settings, aws, f"held_{i}.jpg", make_image(100 + i), f"held-{i}")
    killed = Worker(settings, aws, MeanClassifier(), "i-0123")
    assert len(killed.fetch().jobs) == 3
    assert depth(aws, aws.request_queue_url) == (0, 3)
    # Dropped without a word, as SIGKILL would. A worker on another instance has no claim.
    Worker(settings, aws, MeanClassifier(), "i-other").held.show_what_the_last_worker_held()
    assert depth(aws, aws.request_queue_url) == (0, 3)

    successor = Worker(settings, aws, MeanClassifier(), "i-0123")
    with caplog.at_level(logging.INFO, logger="app_tier.held"):
        successor.held.show_what_the_last_worker_held()
    assert depth(aws, aws.request_queue_url) == (3, 0)
    assert "made 3 request(s) visible again" in caplog.text
    batch = successor.fetch()
    # Each receive counted as an attempt: one that killed the worker is known as such.
    assert sorted(j.receive_count for j in batch.jobs) == [2, 2, 2]
    successor.process(batch)
    assert set(responses(aws)) == {"held-0", "held-1", "held-2"}
    assert depth(aws, aws.request_queue_url) == (0, 0)
    # Nothing held: no file left to mislead a later worker.
    assert not held_journal_path(settings, "i-0123").exists()


def test_the_journal_follows_what_is_held(aws_env):
    settings, aws = aws_env
    for i in range(2):
        upload(settings, aws, f"f_{i}.jpg", make_image(200 + i), f"f-{i}")
    worker = Worker(settings, aws, MeanClassifier(), "i-follow")
    path = held_journal_path(settings, "i-follow")
    batch = worker.fetch()
    written = json.loads(path.read_text())["held"]
    assert sorted(h["receipt"] for h in written) == sorted(j.receipt for j in batch.jobs)
    first = written[0]["hidden_until"]
    worker.held.extend()
    assert json.loads(path.read_text())["held"][0]["hidden_until"] >= first
    worker.held.forget(batch.jobs[:1])
    assert [h["receipt"] for h in json.loads(path.read_text())["held"]] == [batch.jobs[1].receipt]
    worker.process(dataclasses.replace(batch, jobs=batch.jobs[1:]))
    assert not path.exists()


def test_answered_since_is_left_alone(aws_env, caplog):
    """A receipt whose message was answered and deleted (the kill came between the
    delete and the journal's write) fails to change, and that is all."""
    settings, aws = aws_env
    upload(settings, aws, "gone.jpg", make_image(300), "gone")
    worker = Worker(settings, aws, MeanClassifier(), "i-gone")
    batch = worker.fetch()
    path = held_journal_path(settings, "i-gone")
    saved = path.read_text()
    worker.process(batch)
    path.write_text(saved)
    with caplog.at_level(logging.INFO, logger="app_tier.held"):
        Worker(settings, aws, MeanClassifier(), "i-gone").held.show_what_the_last_worker_held()
    assert "made 0 request(s) visible again" in caplog.text
    assert "1 of them could not be" in caplog.text
    assert depth(aws, aws.request_queue_url) == (0, 0)
    assert not path.exists()


def test_take_skips_what_is_visible_again_by_now(tmp_path):
    path = tmp_path / "held.json"
    journal = HeldJournal(path)
    journal.record([("past", 1000.0), ("at-the-margin", 1000.5), ("future", 1100.0)])
    assert journal.take(now=1000.0) == ["future"]
    assert not path.exists()
    assert journal.take(now=1000.0) == []


@pytest.mark.parametrize("text", ["{not json", '{"held": 3}', '{"other": []}',
                                  '{"held": [{"receipt": "r"}]}'])
def test_a_damaged_journal_is_ignored_and_removed(tmp_path, caplog, text):
    path = tmp_path / "held.json"
    path.write_text(text)
    assert HeldJournal(path).take(now=0) == []
    assert "is not a journal of held messages" in caplog.text
    assert not path.exists()


def test_a_journal_that_cannot_write_warns_once_and_goes_on(tmp_path, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    journal = HeldJournal(blocker / "held.json")
    journal.record([("r", 1.0)])
    journal.record([("r", 2.0)])
    assert caplog.text.count("cannot write") == 1
    blocker.unlink()
    with caplog.at_level(logging.INFO):
        journal.record([("r", 3.0)])
    assert "writing" in caplog.text and (blocker / "held.json").exists()


def test_journal_path_is_per_fleet_and_instance_and_safe(tmp_path):
    settings = dataclasses.replace(Settings(), state_dir=str(tmp_path))
    assert held_journal_path(Settings(), "i-1") is None  # no state directory: no journal
    hostile = held_journal_path(settings, "../../etc/passwd")
    assert hostile == tmp_path / f"{settings.fleet_name}-held-.._.._etc_passwd.json"
    other_fleet = dataclasses.replace(settings, prefix="other")
    assert held_journal_path(settings, "i-1") != held_journal_path(other_fleet, "i-1")
