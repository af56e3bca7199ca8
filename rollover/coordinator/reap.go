package coordinator

import (
	"context"
	"os"
	"time"

	"github.com/prometheus/procfs"

	"github.com/rollover-sh/rollover/rollover/wire"
	"golang.org/x/sys/unix"
)

// ReapOrphans reaps zombies that are not generations, once a second, until
// ctx is done. Call it when the coordinator runs as PID 1 (a container's
// init), where every orphan in the container becomes its child.
// Generations are left to their own waiters so their exit status is kept.
func (c *Coordinator) ReapOrphans(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		st, ok := request(c, func(r chan wire.Status) event { return qStatus{reply: r} })
		if !ok {
			return
		}
		ours := map[int]bool{}
		for _, g := range st.Generations {
			ours[g.PID] = true
		}
		for _, pid := range zombieChildren(os.Getpid()) {
			if !ours[pid] {
				var ws unix.WaitStatus
				_, _ = unix.Wait4(pid, &ws, unix.WNOHANG, nil)
			}
		}
	}
}

// zombieChildren lists the zombie processes whose parent is ppid.
func zombieChildren(ppid int) []int {
	procs, err := procfs.AllProcs()
	if err != nil {
		return nil
	}
	var out []int
	for _, p := range procs {
		if st, err := p.Stat(); err == nil && st.State == "Z" && st.PPID == ppid {
			out = append(out, p.PID)
		}
	}
	return out
}
