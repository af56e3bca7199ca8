package coordinator

import (
	"context"
	"os"
	"strconv"
	"strings"
	"time"

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
		ours := map[int]bool{}
		if !c.do(func() {
			for _, g := range c.s.gens {
				ours[g.pid] = true
			}
		}) {
			return
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
	var out []int
	for _, pid := range procPIDs() {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces and parentheses.
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) >= 2 && f[0] == "Z" && f[1] == strconv.Itoa(ppid) {
			out = append(out, pid)
		}
	}
	return out
}
