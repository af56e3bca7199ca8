package coordinator

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultAdoptWait is how long a starting coordinator waits for the
// generations of a predecessor that died to come back and be adopted.
var DefaultAdoptWait = 5 * time.Second

// errAdoptedExit stands for the exit status of an adopted generation, which
// is not our child: only its parent (init) learns how it ended.
var errAdoptedExit = errors.New("exited (adopted: exit status unknown)")

// saved is what the state file keeps so that a coordinator started after a
// crash can recognise its predecessor's generations. The file holds the
// generations' secrets, so it is 0600 next to the control socket.
type saved struct {
	Next     int        `json:"next"`
	Active   int        `json:"active"`
	Previous *Launch    `json:"previous,omitempty"`
	Gens     []savedGen `json:"generations"`
}

type savedGen struct {
	N      int       `json:"generation"`
	PID    int       `json:"pid"`
	Secret string    `json:"secret"`
	Launch Launch    `json:"launch"`
	Start  time.Time `json:"started_at"`
}

func (c *Coordinator) statePath() string { return c.cfg.Socket + ".state" }

// save writes the state file atomically (nil: removes it). The machine calls
// it, on the owner goroutine.
func (c *Coordinator) save(s *saved) {
	if s == nil {
		_ = os.Remove(c.statePath())
		return
	}
	b, err := json.Marshal(s)
	if err != nil {
		return
	}
	tmp := c.statePath() + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		c.log.Warn("state file", "err", err)
		return
	}
	if err := os.Rename(tmp, c.statePath()); err != nil {
		c.log.Warn("state file", "err", err)
	}
}

// adopt takes over the live generations a crashed predecessor left behind:
// they keep serving, reconnect to the socket and say hello with Adopt. It
// returns true when the predecessor's active generation was adopted, so
// there is no generation 1 to start.
func (c *Coordinator) adopt() bool {
	b, err := os.ReadFile(c.statePath())
	if err != nil {
		return false
	}
	var s saved
	if err := json.Unmarshal(b, &s); err != nil {
		c.log.Warn("ignoring an unreadable state file", "path", c.statePath(), "err", err)
		return false
	}
	var waiting []*gen
	for _, sg := range s.Gens {
		if syscall.Kill(sg.PID, 0) != nil {
			continue // gone; a recycled pid cannot know the secret anyway
		}
		proc, err := os.FindProcess(sg.PID)
		if err != nil {
			continue
		}
		g := newGen(sg.N, sg.Launch)
		g.pid, g.secret, g.start, g.proc = sg.PID, sg.Secret, sg.Start, proc
		g.adopting = true
		g.wasActive = sg.N == s.Active
		g.instances = sg.Launch.Instances // as far as we know: its supervisor told our predecessor
		waiting = append(waiting, g)
	}
	if len(waiting) == 0 {
		return false
	}
	c.do(func(r chan struct{}) event { return evAdoptLoad{s: s, gens: waiting, reply: r} })
	c.log.Info("waiting for the generations of a previous coordinator", "count", len(waiting), "up_to", c.cfg.AdoptWait)
	deadline := time.NewTimer(c.cfg.AdoptWait)
	defer deadline.Stop()
	for _, g := range waiting {
		select {
		case <-g.hello:
		case <-deadline.C:
		}
	}
	a, _ := request(c, func(r chan adoption) event { return evAdoptDecide{waiting: waiting, reply: r} })
	for _, g := range waiting {
		select {
		case <-g.hello:
			c.tasks.Go(func(context.Context) { c.watchAdopted(g) }) // ends with the process, which Run outlives
		default:
		}
	}
	// A generation that was starting or ready but not active was a rollover
	// in progress when the predecessor died: that rollover failed. Point the
	// port back at the active one and let the others go.
	if a.active != nil {
		if v := c.view(a.active); v.steerable {
			c.pinTo(a.active, v)
		}
	}
	c.do(func(r chan struct{}) event { return evAdoptEnd{others: a.others, reply: r} })
	if a.active != nil {
		c.log.Info("adopted the active generation of a previous coordinator", "gen", a.active.n, "pid", a.active.pid, "command", a.active.launch.Argv)
	}
	return a.active != nil
}

// watchAdopted reports an adopted generation's exit; it is not our child,
// so we watch a pidfd instead of waiting for it.
func (c *Coordinator) watchAdopted(g *gen) {
	defer c.processEnded(g, errAdoptedExit)
	fd, err := unix.PidfdOpen(g.pid, 0)
	if err != nil {
		// No pidfd (linux < 5.3): look once a tenth of a second.
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for syscall.Kill(g.pid, 0) == nil {
			<-t.C
		}
		return
	}
	defer unix.Close(fd)
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		if _, err := unix.Poll(fds, -1); err == nil || !errors.Is(err, unix.EINTR) {
			return
		}
	}
}
