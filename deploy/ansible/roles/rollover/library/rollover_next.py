#!/usr/bin/python
# -*- coding: utf-8 -*-
# rollover_next: roll one host's rollover coordinator over to a new command
# line with `rollover next --wait --json --expect-generation N`.

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: rollover_next
short_description: Roll a rollover coordinator over to a new command line
description:
  - Runs C(rollover next --wait --json --expect-generation N -- COMMAND)
    against one coordinator on the host and reports each phase, its time and
    the rollover's loss report.
  - Idempotent. When the active generation already runs the same command line
    (the same argv) from the same binary (the same file contents), it reports
    C(ok) and rolls nothing.
  - The binary of the active generation is read through C(/proc/PID/exe), so a
    binary replaced on disk since the generation started is seen as a change.
    When argv[0] is not the executable the generation runs (a script, a
    wrapper), its modification time is compared with the generation's start
    instead.
  - Fails the host when C(rollover next) exits 1 (refused, failed, or rolled
    back during its bake or canary; the old generation keeps serving) or 4
    (the drain cut connections or requests), with the one-line reason as
    C(msg).
options:
  command:
    description:
      - The new generation's command line, argv[0] first. A relative path
        with a slash is made absolute here, as the CLI does; a bare name is
        looked up in this module's C(PATH) for the binary check.
    type: list
    elements: str
    required: true
  socket:
    description: The coordinator's control socket (C(rollover --socket)); it wins over I(name), as in the CLI.
    type: path
  name:
    description:
      - The coordinator's name (C(rollover --name)); its socket is
        C(/run/rollover/NAME.sock) for a system service.
    type: str
  executable:
    description: The rollover binary.
    type: path
    default: rollover
  expect_generation:
    description:
      - Roll over only if this generation is still the active one, a
        compare-and-swap against a concurrent deploy (C(rollover next
        --expect-generation)). Without it, the generation this module reads
        just before the rollover is expected. A host already on I(command) is
        C(ok), whatever its generation.
    type: int
  bake:
    description: This rollover's bake (C(--bake)), e.g. C(30s).
    type: str
  health_url:
    description: This rollover's health probe (C(--health-url)).
    type: str
  canary:
    description: Canary steps (C(--canary)), e.g. C(10%) or C(5%,25%,100%).
    type: str
  step:
    description: How long each canary step lasts (C(--step)); needed with I(canary), since nobody promotes.
    type: str
  env_file:
    description:
      - An environment file of C(rollover@.service) (C(/etc/rollover/NAME.env)).
        Once the host runs I(command), its C(ROLLOVER_COMMAND=) line is set to
        it, so that a restart of the unit starts the same build. Left alone
        when the host is not on I(command).
    type: path
notes:
  - Supports check mode; it then reads the coordinator's status and reports
    whether a rollover would happen.
  - Returns the generations before and after, the phases, and the loss report.
author: rollover authors
"""

EXAMPLES = r"""
- name: Roll the api over to the new build
  rollover_next:
    name: api
    command: [/usr/local/bin/api-2024.06.1, -addr, ":8080"]
    bake: 30s
    health_url: http://127.0.0.1:8080/healthz
  register: rollover_result
"""

RETURN = r"""
generation_before:
  description: The active generation before.
  type: int
  returned: always
generation_after:
  description: The active generation after (the old one when rolled back).
  type: int
  returned: always
generations_before:
  description: The live generations before, as C(rollover status --json) lists them.
  type: list
  returned: always
generations_after:
  description: The live generations after.
  type: list
  returned: when the module ran C(rollover next)
up_to_date:
  description: Whether the active generation already ran I(command) from the same binary.
  type: bool
  returned: always
binary:
  description:
    - How the binary was compared, C(sha256) of C(/proc/PID/exe) against the
      file, or C(mtime) against the generation's start; and the digests.
  type: dict
  returned: when the command lines match
phases:
  description:
    - The rollover's events as C(rollover next --json) prints them (phase,
      generation, pid, ms, text, stats, weight), each with C(t_ms), the time
      since the module ran C(next).
  type: list
  returned: when the module ran C(rollover next)
report:
  description:
    - The loss report (C(null) if the rollover ended before it was made), with
      forced_connections and forced_requests cut at the drain deadline, the
      5xx and panics of each generation, the kernel's TcpExt counters over the
      window, rolled_back and reason.
  type: dict
  returned: when the module ran C(rollover next)
rc:
  description: The exit code of C(rollover next).
  type: int
  returned: when the module ran C(rollover next)
stderr:
  description: What C(rollover next) printed on stderr.
  type: str
  returned: when the module ran C(rollover next)
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from datetime import datetime, timezone

from ansible.module_utils.basic import AnsibleModule

# rollover next --wait: the new generation is active, but its drain cut
# connections or requests.
EXIT_CUT = 4


class Failure(Exception):
    """A reason to fail the host, with the results gathered so far."""

    def __init__(self, msg, **result):
        Exception.__init__(self, msg)
        self.msg = msg
        self.result = result


def one_line(stderr):
    """The CLI's reason: its last `rollover: ...` line, or its last line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("rollover: "):
            return ln[len("rollover: "):]
    return lines[-1] if lines else ""


class Coordinator:
    def __init__(self, module):
        p = module.params
        self.module = module
        self.exe = p["executable"]
        self.target = []
        if p["socket"]:
            self.target = ["--socket", p["socket"]]
        elif p["name"]:
            self.target = ["--name", p["name"]]

    def argv(self, *args):
        return [self.exe] + list(args[:1]) + self.target + list(args[1:])

    def status(self):
        rc, out, err = self.module.run_command(self.argv("status", "--json"))
        if rc != 0:
            raise Failure(one_line(err) or "rollover status exited %d" % rc, rc=rc, stderr=err)
        try:
            return json.loads(out)
        except ValueError as e:
            raise Failure("rollover status --json printed no JSON (%s): %s" % (e, out[:200]))

    def next(self, expect, command):
        p = self.module.params
        args = ["next", "--wait", "--json", "--expect-generation", str(expect)]
        for flag, key in (("--bake", "bake"), ("--health-url", "health_url"), ("--canary", "canary"), ("--step", "step")):
            if p[key]:
                args += [flag, p[key]]
        argv = self.argv(*args) + ["--"] + command
        phases = []
        report = None
        start = time.monotonic()
        with tempfile.TemporaryFile() as errf:
            # Read the events as they come, to time each phase.
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errf, stdin=subprocess.DEVNULL)
            for raw in proc.stdout:
                t_ms = int((time.monotonic() - start) * 1000)
                try:
                    ev = json.loads(raw)
                except ValueError:
                    continue
                if ev.get("phase") == "report":
                    report = ev.get("report")
                    continue
                ev["t_ms"] = t_ms
                phases.append(ev)
            rc = proc.wait()
            errf.seek(0)
            err = errf.read().decode("utf-8", "replace")
        return rc, err, phases, report


def absolute(command):
    argv0 = command[0]
    if "/" in argv0 and not os.path.isabs(argv0):
        return [os.path.abspath(argv0)] + command[1:]
    return list(command)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_time(s):
    """An RFC 3339 time as Go writes it (nanoseconds, Z or an offset)."""
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", s or "")
    if not m:
        return None
    base, frac, zone = m.groups()
    micro = int(((frac or "") + "000000")[:6])
    if zone == "Z":
        zone = "+00:00"
    dt = datetime.strptime(base + zone.replace(":", ""), "%Y-%m-%dT%H:%M:%S%z")
    return dt.replace(microsecond=micro).timestamp()


def same_binary(gen, argv0):
    """Whether the generation runs the file argv0 names, as it is now.

    Returns (same, info); same is None when it cannot be told.
    """
    wanted = argv0 if "/" in argv0 else shutil.which(argv0)
    if not wanted:
        return None, {"method": "none", "error": "%s is not on this module's PATH" % argv0}
    wanted = os.path.realpath(wanted)
    proc_exe = "/proc/%d/exe" % gen["pid"]
    try:
        running = os.readlink(proc_exe)
    except OSError as e:
        return None, {"method": "none", "error": "%s: %s" % (proc_exe, e.strerror)}
    # A binary replaced by rename since the start reads "PATH (deleted)".
    if running.endswith(" (deleted)"):
        running = running[: -len(" (deleted)")]
    if running == wanted:
        try:
            have = sha256(proc_exe)
        except OSError as e:
            return None, {"method": "none", "error": "%s: %s" % (proc_exe, e.strerror)}
        want = sha256(wanted)
        return have == want, {"method": "sha256", "path": wanted, "active_sha256": have, "wanted_sha256": want}
    # argv[0] is a script or a wrapper: its interpreter runs, not the file.
    started = parse_time(gen.get("started_at"))
    mtime = os.stat(wanted).st_mtime
    if started is None:
        return None, {"method": "none", "error": "unreadable started_at %r" % gen.get("started_at")}
    return mtime <= started, {"method": "mtime", "path": wanted, "running": running, "mtime": mtime, "started": started}


def active_gen(st):
    for g in st.get("generations") or []:
        if g.get("generation") == st.get("active"):
            return g
    return None


def sync_env_file(module, path, command):
    """Set ROLLOVER_COMMAND= in path to command; True when it changed."""
    if not path or not os.path.exists(path):
        return False
    if any(re.search(r"\s", a) or a == "" for a in command):
        module.warn("%s left alone: ROLLOVER_COMMAND is split on spaces, and the command has an empty word or one with a space" % path)
        return False
    want = "ROLLOVER_COMMAND=" + " ".join(command)
    with open(path) as f:
        lines = f.read().splitlines()
    out = [want if ln.startswith("ROLLOVER_COMMAND=") else ln for ln in lines]
    if want not in out:
        out.append(want)
    if out == lines:
        return False
    if not module.check_mode:
        tmp = path + ".rollover-tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(out) + "\n")
        os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        module.atomic_move(tmp, path)
    return True


def run(module):
    p = module.params
    if not p["command"]:
        raise Failure("command is empty: give the new generation's argv, argv[0] first")
    if p["canary"] and not p["step"]:
        raise Failure("canary needs step: nobody is there to run `rollover promote`")
    command = absolute(p["command"])
    # Checked here too, so that a plan in check mode finds a missing build
    # before any host rolls. A bare name is the coordinator's PATH's to find.
    if "/" in command[0] and not (os.path.isfile(command[0]) and os.access(command[0], os.X_OK)):
        raise Failure("%s: no such executable on this host (command[0])" % command[0])
    co = Coordinator(module)
    st = co.status()
    before = st.get("active", 0)
    result = {"generation_before": before, "generation_after": before, "generations_before": st.get("generations") or []}
    gen = active_gen(st)
    if gen is None:
        raise Failure("no active generation on this coordinator: nothing to roll over from", **result)
    if st.get("rollover_in_progress"):
        raise Failure("rollover in progress on this coordinator: wait for it to finish and try again", **result)
    expect = p["expect_generation"] or before
    up_to_date = False
    if gen.get("argv") == command:
        same, info = same_binary(gen, command[0])
        result["binary"] = info
        if same is None:
            module.warn("cannot tell the active generation's binary (%s): rolling over" % info.get("error"))
        up_to_date = bool(same)
    result["up_to_date"] = up_to_date
    if up_to_date:
        result["changed"] = sync_env_file(module, p["env_file"], command)
        return result
    if module.check_mode:
        if before != expect:
            # What `next --expect-generation` would answer.
            raise Failure("refused: the active generation is %d, not %d (--expect-generation)" % (before, expect), **result)
        result["changed"] = True
        return result
    rc, err, phases, report = co.next(expect, command)
    result.update(rc=rc, stderr=err, phases=phases, report=report)
    try:
        after = co.status()
        result["generation_after"] = after.get("active", 0)
        result["generations_after"] = after.get("generations") or []
    except Failure as e:
        module.warn("status after the rollover: %s" % e.msg)
    result["changed"] = rc in (0, EXIT_CUT)
    if result["changed"]:
        sync_env_file(module, p["env_file"], command)
    if rc != 0:
        raise Failure(one_line(err) or "rollover next exited %d" % rc, **result)
    return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            command=dict(type="list", elements="str", required=True),
            socket=dict(type="path"),
            name=dict(type="str"),
            executable=dict(type="path", default="rollover"),
            expect_generation=dict(type="int"),
            bake=dict(type="str"),
            health_url=dict(type="str"),
            canary=dict(type="str"),
            step=dict(type="str"),
            env_file=dict(type="path"),
        ),
        supports_check_mode=True,
    )
    try:
        result = run(module)
    except Failure as e:
        module.fail_json(msg=e.msg, **e.result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
