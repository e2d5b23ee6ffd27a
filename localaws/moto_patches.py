"""Changes to moto's own code, made in the embedded AWS's server process (apply).

localaws/moto_server.py applies them before it builds moto's application. Each
keeps moto's behaviour exactly (see tests/unit/test_moto_patches.py); each
removes a cost found by profiling the server under the service's own calls
(`make bench`, parts f and h, yappi and py-spy):

1. `unix_time()` built two datetimes per call and subtracted them (~10 us);
   SQS calls it twice per queued message whenever it counts messages.
   Without an argument it is simply `time.time()`.
2. ReceiveMessage checked each returned message's retention period by
   computing *all* the queue's attributes (three O(depth) counts). The
   retention period is a plain attribute of the queue: read it directly.
3. Counting visible, in-flight and delayed messages (GetQueueAttributes, and
   SendMessage, which builds all attributes to read one FIFO setting) read
   the clock once per message through two properties: read it once per count.
4. Every request looked up its service by listing moto's package directory
   (~175 `isdir` calls per request, ~28 % of the server's CPU): list it once.
5. `camelcase_to_underscores`, a pure function of a handful of strings, ran
   character by character thousands of times a second: memoise it.
6. An instance's tags were found by a search of every tag of every resource
   (describe_tags with the instance's id as a pattern), once per instance and
   per tag filter of a DescribeInstances: the terminated instances moto keeps
   made each uncached call slower, quadratically (~60 ms with 200, 1 s with
   800: a day of scaling to zero and back). They are looked up by id,
   and, as on EC2, a terminated instance is gone an hour after its end:
   measured in-process, a describe of 800 instances, 785 of them terminated,
   took 1,295 ms, 69 ms with the lookup by id.
7. moto keeps each S3 object over ~5 MB in a deleted temporary file, open for
   as long as the server runs (a descriptor and hidden disk space per large
   photo): objects up to S3_OBJECT_IN_MEMORY_BYTES stay in memory.

Three changes are for correctness. The first: one GetQueueAttributes counts
visible and in-flight messages at one instant (sqs_counts_at_one_instant); moto
reads the clock for each count, and a message whose visibility lapsed between
them was in neither. The second: each service's requests run one at a time
(localaws/moto_middleware.py's ServiceLocks, which says why), and an SQS long
poll lets go of that lock while it waits, as its queue's condition variable
shares it (_sqs_long_polls_let_sends_in). The third: RunInstances repeated with a
ClientToken returns the instances the first call made, or refuses the token once they
have terminated, as EC2 does; moto made more (_ec2_launches_once_per_client_token).
The controller repeats a launch that got no answer with its token (controller/act.py),
and botocore repeats one answered late.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from datetime import datetime
from typing import Any

from localaws.moto_middleware import SERVICE_LOCKS


def apply() -> None:
    """Make the changes of the module's docstring to moto's code, in this process."""
    for patch in (sqs_counts_at_one_instant, _sqs_reads_the_clock_once, _sqs_long_polls_let_sends_in,
                  _services_listed_once, _names_converted_once, _ec2_tags_found_by_id,
                  _ec2_forgets_terminated_instances, _ec2_launches_once_per_client_token,
                  _s3_objects_stay_in_memory):
        patch()


class _Instant(threading.local):
    """The time a GetQueueAttributes is answered at, in the thread answering it."""

    now: float | None = None


_instant = _Instant()


def sqs_counts_at_one_instant() -> None:
    """Change 1 (SQS's clock read as time.time()) and the first change for correctness
    (one GetQueueAttributes counting every message at one instant).

    moto reads the clock anew for each count (and, asked for named attributes, builds
    them all once per name), so a message whose visibility timeout lapses between the
    count of visible messages and that of in-flight ones is in neither: a queue holding
    work reads as empty, which a controller or a test waiting for a drained queue takes
    at its word. Real SQS's counts are approximate, but do not lose a message so.
    The unit tests' in-process moto gets this change too (tests/unit/conftest.py)."""
    from moto.core import utils
    from moto.sqs import models

    original_unix_time = utils.unix_time

    def unix_time(dt: datetime | None = None) -> float:
        if dt is not None:
            return original_unix_time(dt)
        return time.time() if _instant.now is None else _instant.now

    def unix_time_millis(dt: datetime | None = None) -> float:
        return unix_time(dt) * 1000.0

    # sqs.models imported both names into its own namespace: patch them there.
    models.unix_time = unix_time
    models.unix_time_millis = unix_time_millis

    answer = models.SQSBackend.get_queue_attributes
    if getattr(answer, "at_one_instant", False):
        return

    @functools.wraps(answer)
    def get_queue_attributes(self: models.SQSBackend, queue_name: str,
                             attribute_names: list[str]) -> dict[str, Any]:
        outer = _instant.now  # moto's own checks may ask within an answer: one instant still
        if outer is None:
            _instant.now = time.time()
        try:
            return answer(self, queue_name, attribute_names)
        finally:
            _instant.now = outer

    get_queue_attributes.at_one_instant = True
    models.SQSBackend.get_queue_attributes = get_queue_attributes


def _sqs_reads_the_clock_once() -> None:
    """Changes 2-3: the clock read once per count, and a receive's retention check
    reading the queue's one attribute."""
    from moto.sqs import models

    # models.unix_time* looked up at each call: whichever clock sqs_counts_at_one_instant set.
    def is_message_valid_based_on_retention_period(self: models.SQSBackend, queue_name: str,
                                                    message: models.Message) -> bool:
        queue = self.get_queue(queue_name)
        return queue.message_retention_period + message.sent_timestamp / 1000 > models.unix_time()

    models.SQSBackend.is_message_valid_based_on_retention_period = is_message_valid_based_on_retention_period

    # Message.visible is `now > visible_at`, Message.delayed is `now < delayed_until`.
    def count_delayed(self: models.Queue) -> int:
        now = models.unix_time_millis()
        return sum(1 for m in self._messages if now < m.delayed_until)

    def count_not_visible(self: models.Queue) -> int:
        now = models.unix_time_millis()
        return sum(1 for m in self._messages if not now > m.visible_at)

    def visible_messages(self: models.Queue) -> list:
        now = models.unix_time_millis()
        return [m for m in self._messages if now > m.visible_at and not now < m.delayed_until]

    models.Queue.approximate_number_of_messages_delayed = property(count_delayed)
    models.Queue.approximate_number_of_messages_not_visible = property(count_not_visible)
    models.Queue.messages = property(visible_messages)


def _sqs_long_polls_let_sends_in() -> None:
    """A long poll waits on its queue's condition variable: built on the lock that
    serialises SQS requests (ServiceLocks), the wait lets the sends it waits for in."""
    from moto.sqs import models

    original_queue_init = models.Queue.__init__

    def queue_init(self: models.Queue, *args: Any, **kwargs: Any) -> None:
        original_queue_init(self, *args, **kwargs)
        self._messages_lock = threading.Condition(SERVICE_LOCKS["sqs"])

    models.Queue.__init__ = queue_init


def _services_listed_once() -> None:
    """Change 4."""
    from moto import backends

    modules = tuple(backends.list_of_moto_modules())
    backends.list_of_moto_modules = lambda: modules


def _names_converted_once() -> None:
    """Change 5."""
    from moto.core import responses, utils
    from moto.sqs import models

    fast_camel = functools.lru_cache(maxsize=4096)(utils.camelcase_to_underscores)
    for module in (utils, responses, models):
        module.camelcase_to_underscores = fast_camel


def _ec2_tags_found_by_id() -> None:
    """Change 6: describe_tags(resource-id=[id]) matched a pattern made of the id against
    every tag of every resource, for each instance and each tag filter."""
    from moto.ec2.models.core import TaggedEC2Resource
    from moto.ec2.utils import EC2_PREFIX_TO_RESOURCE, get_prefix

    def get_tags(self: TaggedEC2Resource) -> list[dict[str, str]]:
        if not self.id:
            return []
        kind = EC2_PREFIX_TO_RESOURCE.get(get_prefix(self.id), "")
        return [{"resource_id": self.id, "key": key, "value": value, "resource_type": kind}
                for key, value in self.ec2_backend.tags.get(self.id, {}).items()]

    TaggedEC2Resource.get_tags = get_tags


def _ec2_forgets_terminated_instances() -> None:
    """Change 6, as EC2: a terminated instance is gone TERMINATED_KEPT_S after its end."""
    from moto.ec2.models.instances import Instance, InstanceBackend

    original_terminate = Instance.terminate

    def terminate(self: Instance) -> Any:  # moto's InstanceState
        previous = original_terminate(self)
        self.imgclass_terminated_at = time.time()
        return previous

    original_all_reservations = InstanceBackend.all_reservations

    def all_reservations(self: InstanceBackend, filters: Any = None) -> list:
        forget_terminated(self, time.time() - TERMINATED_KEPT_S)
        return original_all_reservations(self, filters)

    Instance.terminate = terminate
    InstanceBackend.all_reservations = all_reservations


def _ec2_launches_once_per_client_token() -> None:
    """As EC2: a RunInstances whose ClientToken a reservation it holds was made with
    returns that reservation, and launches nothing; once its instance has terminated, the
    token is refused (IdempotentInstanceTerminated, since January 2025). (EC2 also refuses
    the token with other parameters, IdempotentParameterMismatch: the controller never
    does that.)"""
    from moto.ec2.exceptions import EC2ClientError
    from moto.ec2.models.instances import InstanceBackend

    original_run_instances = InstanceBackend.run_instances

    def run_instances(self: InstanceBackend, image_id: str, count: int, user_data: Any,
                      security_group_names: list[str], **kwargs: Any) -> Any:  # a Reservation
        token = kwargs.get("client_token")
        if token and token != MOTO_DEFAULT_CLIENT_TOKEN:
            for reservation in self.reservations.values():
                if any(instance.client_token == token for instance in reservation.instances):
                    if any(instance.state == "terminated" for instance in reservation.instances):
                        raise EC2ClientError("IdempotentInstanceTerminated",
                                             "The client token you have provided is associated with a "
                                             "resource that is already deleted. Please use a different "
                                             "client token.")
                    return reservation
        return original_run_instances(self, image_id, count, user_data, security_group_names, **kwargs)

    InstanceBackend.run_instances = run_instances


# What moto's RunInstances takes for the ClientToken of a call that gave none.
MOTO_DEFAULT_CLIENT_TOKEN = "ABCDE"


def _s3_objects_stay_in_memory() -> None:
    """Change 7."""
    from moto.s3 import models as s3_models

    def key_buffer_size() -> int:
        return int(os.environ.get("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", S3_OBJECT_IN_MEMORY_BYTES))

    s3_models.get_s3_default_key_buffer_size = key_buffer_size


# moto keeps an object over ~5 MB in a deleted temporary file, open for as long as the
# server runs: each photo of 5-10 MB held a descriptor and disk space (or RAM, where
# /tmp is a tmpfs) that neither `du` nor `ls` showed. The embedded AWS keeps
# everything in memory anyway: objects up to this size stay there.
S3_OBJECT_IN_MEMORY_BYTES = 64 * 1024**2


# As EC2 shows a terminated instance for about an hour, then never again. moto kept
# every one, and each made every call that finds instances slower.
TERMINATED_KEPT_S = 3600.0


def forget_terminated(backend: Any, before: float) -> None:
    """Drop the reservations whose instances were all terminated before `before`
    (a Unix time), and their tags."""
    for reservation_id, reservation in list(backend.reservations.items()):
        ended = [getattr(i, "imgclass_terminated_at", None) for i in reservation.instances]
        if ended and all(at is not None and at < before for at in ended):
            del backend.reservations[reservation_id]
            for instance in reservation.instances:
                backend.tags.pop(instance.id, None)

