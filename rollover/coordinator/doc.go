// Package coordinator is the engine behind `rollover start`: a stable-PID
// foreground process that spawns generations of an app, rolls them over on
// request, and never serves app traffic itself.
//
// What it guarantees:
//   - At most one rollover at a time. A rollover is in progress from the
//     spawn of generation N+1 until N has left the port and N+1 is re-pinned;
//     N's connection drain runs after that, so rollovers can follow each
//     other while older generations still drain. `next` without --wait
//     returns once N+1 is active and baked and N has left the port, or,
//     when N+1 is steered every new connection, at most the drain grace
//     plus a second after N was told to drain (a hung N cannot hold it).
//   - Until N+1 is active, any failure (missing binary, exit, crash, no ready
//     within ReadyTimeout, failed steering verification) ends N+1 and leaves
//     N serving untouched.
//   - A drain is bounded: past DrainTimeout the generation's process group
//     gets SIGTERM, then SIGKILL after KillGrace, and the drain is counted as
//     forced.
//   - When the active generation exits on its own, its command is restarted
//     with an exponential backoff capped at MaxRestartDelay.
//   - Commands are exec'd as argv, never through a shell, each in its own
//     process group, with ROLLOVER_SOCKET, ROLLOVER_GENERATION and a
//     per-generation ROLLOVER_SECRET.
//   - The control socket is 0600 in a directory that is not world-writable; a
//     live socket is never taken over, a stale one is replaced. Generations
//     must present their secret from the pid that was spawned, and CLI peers
//     must be the coordinator's uid or root (SO_PEERCRED).
//
// One goroutine owns all state. It lives in machine.go: typed generation
// states, typed events, and one transition function (machine.step) that is
// the only writer. A rollover is one value, a rollout (rollout.go), whose
// script runs on a goroutine of its own from spawn to loss report, with
// typed phases and outcomes; it changes state only through events, and
// what it needs to know comes back in replies and verdicts. Everything
// else (the control socket, process waiters, timers) posts events and
// waits on channels; nothing waits by sleeping.
//
// Every goroutine and timer is a task with an owner that waits for it:
// Run returns only once the generations are gone and every task has
// returned (goleak checks it in the tests).
//
// Generations are exec.Cmds (Cancel sends SIGTERM to the process group,
// WaitDelay bounds it before SIGKILL); /proc is read through
// github.com/prometheus/procfs.
package coordinator
