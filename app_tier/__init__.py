"""App tier: the worker that classifies images with ResNet-50."""

# The worker's exit status when it cannot start as configured (EX_CONFIG): a setting
# is wrong, its model's weights cannot be loaded, or a worker running on this machine
# serves the same instance id (app_tier/held_journal.py). Its supervisor (systemd on an
# instance, the local runner) does not restart it: it would only fail again the same way.
EXIT_CANNOT_START = 78

# The worker's exit status when it gives up serving (receiving or storing results fails
# for STALL_TIMEOUT on a fault of its own, the model fails on a plain input too, or runs
# short of memory at every call) and EC2 has its report of
# its instance failed, for the controller to replace it. Its supervisor does not restart it:
# restarted, it would take batches again and release them, each costing its requests an
# attempt, until the instance is gone.
EXIT_GAVE_UP = 79

# The worker's exit status when a model call, an image's decoding or one of its
# loops stalled (EX_SOFTWARE): it has given its messages back, and its supervisor
# starts it afresh.
EXIT_STALLED = 70

# What a warm spare (--instance-id -) tells the runner, as systemd's STATUS=, once its
# model is loaded and it waits for an instance id.
SPARE_LOADED = "model loaded, waiting for an instance"
