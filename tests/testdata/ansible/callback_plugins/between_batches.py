# A callback for tests/ansible_test.go only: it runs one command between the
# first and the second batch of the play "Roll over" (deploy/ansible/
# rollout.yml), as a concurrent deploy by hand would, and records its exit
# code and output. It does nothing unless ROLLOVER_TEST_BETWEEN_BATCHES is
# set to {"argv": [...], "out": "PATH"}.

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = """
name: between_batches
type: aggregate
short_description: run a command between two batches of the play "Roll over" (tests only)
description:
  - Runs the argv of $ROLLOVER_TEST_BETWEEN_BATCHES when the second batch of
    the play "Roll over" starts, before its first task, and writes its exit
    code, stdout and stderr as JSON to the file it names.
"""

import json
import os
import subprocess

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "between_batches"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super(CallbackModule, self).__init__()
        raw = os.environ.get("ROLLOVER_TEST_BETWEEN_BATCHES")
        self.spec = json.loads(raw) if raw else None
        self.batches = 0

    def v2_playbook_on_play_start(self, play):
        # Sent once per batch of a serial play.
        if self.spec is None or play.get_name() != "Roll over":
            return
        self.batches += 1
        if self.batches != 2:
            return
        p = subprocess.run(self.spec["argv"], stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        with open(self.spec["out"], "w") as f:
            json.dump({"rc": p.returncode, "stdout": p.stdout.decode(), "stderr": p.stderr.decode()}, f)
        self._display.display("between batches: %s: exit %d" % (" ".join(self.spec["argv"]), p.returncode))
