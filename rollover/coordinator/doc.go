// Package coordinator is the engine behind `rollover start`: a stable-PID
// foreground process that spawns generations of an app, rolls them over on
// request, and never serves app traffic itself.
//
// What it guarantees:
//   - At most one rollover at a time. A rollover is in progress from the
//     spawn of generation N+1 until N has left the port and N+1 is re-pinned;
//     N's connection drain runs after that, so rollovers can follow each
//     other while older generations still drain.
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
// the only writer. Everything else (the control socket, process waiters,
// timers, the rollover sequence in rollover.go) posts events and waits on
// channels; nothing waits by sleeping.
//
// Generations are exec.Cmds (Cancel sends SIGTERM to the process group,
// WaitDelay bounds it before SIGKILL); /proc is read through
// github.com/prometheus/procfs.
package coordinator
