"""An executor defined outside chla (tests/launcher/test_executor_plugin.py): the local executor's
way of running processes, with a scheduler of its own made of files in a queue directory (the
recipe's `queuefile: {queue: DIR}`):
- the scheduler announces a preemption by writing DIR/preempt before it sends SIGTERM; a SIGTERM
  without that notice is a cancellation, and the job ends;
- a task that was preempted asks to be requeued by writing DIR/requeue-<attempt> (rank 0, from its
  job environment's requeue()); the login side starts the task again only when that request is
  there, and consumes it together with the notice.

Registered by this folder's chla_test_executor-0.1.dist-info/entry_points.txt, which
importlib.metadata finds once the folder is on PYTHONPATH. This module is what the entry point
loads: it names the three parts and imports none of them."""

from chla_launcher.contract.executor_registry import ExecutorPlugin

PLUGIN = ExecutorPlugin(
    name="queuefile",
    login="chla_test_executor.login:QueueFileExecutor",
    job_environment="chla_test_executor.job:QueueFileJobEnvironment",
    settings="chla_test_executor.settings:QueueFileSettings",
)
