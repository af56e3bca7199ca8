package coordinator

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rollover-sh/rollover/rollover/wire"
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

// persist writes the state file (atomically). It is called after every
// change a successor would need: a spawn, an activation, an exit.
func (c *Coordinator) persist() {
	var s saved
	if !c.do(func() {
		s.Next, s.Previous = c.s.next, c.s.previous
		if c.s.active != nil {
			s.Active = c.s.active.n
		}
		for _, g := range c.s.gens {
			s.Gens = append(s.Gens, savedGen{N: g.n, PID: g.pid, Secret: g.secret, Launch: g.launch, Start: g.start})
		}
	}) {
		return
	}
	b, err := json.Marshal(s)
	if err != nil {
		return
	}
	c.persistMu.Lock()
	defer c.persistMu.Unlock()
	if c.final {
		return // Run is over; the file is gone for good
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
	c.do(func() {
		c.s.next = s.Next
		c.s.previous = s.Previous
		for _, sg := range s.Gens {
			if syscall.Kill(sg.PID, 0) != nil {
				continue // gone; a recycled pid cannot know the secret anyway
			}
			proc, err := os.FindProcess(sg.PID)
			if err != nil {
				continue
			}
			g := newGen(sg.Launch)
			g.n, g.pid, g.secret, g.start, g.proc = sg.N, sg.PID, sg.Secret, sg.Start, proc
			g.adopting = true
			g.wasActive = sg.N == s.Active
			c.s.gens[g.n] = g
			waiting = append(waiting, g)
		}
	})
	if len(waiting) == 0 {
		return false
	}
	c.log.Info("waiting for the generations of a previous coordinator", "count", len(waiting), "up_to", c.cfg.AdoptWait)
	deadline := time.After(c.cfg.AdoptWait)
	for _, g := range waiting {
		select {
		case <-g.hello:
		case <-deadline:
		}
	}
	var active *gen
	var others []*gen
	c.do(func() {
		for _, g := range waiting {
			select {
			case <-g.hello:
			default:
				// Not back in time: it drains on its own when its adoption
				// window ends. Forget it.
				delete(c.s.gens, g.n)
				continue
			}
			if g.wasActive && g.state == stateReady {
				active = g
				g.state = stateActive
				g.activeAt = time.Now()
				c.s.active = g
				c.s.started = true
			} else {
				others = append(others, g)
			}
		}
	})
	for _, g := range waiting {
		select {
		case <-g.hello:
			go c.watchAdopted(g)
		default:
		}
	}
	// A generation that was starting or ready but not active was a rollover
	// in progress when the predecessor died: that rollover failed. Point the
	// port back at the active one and let the others go.
	if active != nil && active.steerable {
		if err := c.command(active, wire.Msg{Type: wire.TypePin}, commandTimeout); err != nil {
			c.log.Warn("re-pin of the adopted active generation failed", "gen", active.n, "err", err)
		}
	}
	for _, g := range others {
		if g.state == stateDraining {
			go c.watchDrain(g) // it was told before the crash
		} else {
			c.drain(g)
		}
	}
	if active != nil {
		c.log.Info("adopted the active generation of a previous coordinator", "gen", active.n, "pid", active.pid, "command", active.argv)
	}
	c.persist()
	return active != nil
}

// watchAdopted reports an adopted generation's exit; it is not our child,
// so we watch a pidfd instead of waiting for it.
func (c *Coordinator) watchAdopted(g *gen) {
	fd, err := unix.PidfdOpen(g.pid, 0)
	if err != nil {
		// No pidfd (old kernel): poll.
		for syscall.Kill(g.pid, 0) == nil {
			time.Sleep(100 * time.Millisecond)
		}
		c.gone(g, errAdoptedExit)
		return
	}
	defer unix.Close(fd)
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		if _, err := unix.Poll(fds, -1); err == nil || !errors.Is(err, unix.EINTR) {
			break
		}
	}
	c.gone(g, errAdoptedExit)
}

// acceptAdoption handles a hello with Adopt from a generation this
// coordinator expects to adopt. Owner only.
func (c *Coordinator) acceptAdoption(g *gen, hello wire.Msg) string {
	if !g.adopting {
		return fmt.Sprintf("generation %d was not left by a previous coordinator", g.n)
	}
	g.adopting = false
	g.steerable, g.steerErr = hello.Steerable, hello.SteerError
	switch hello.State {
	case stateReady:
		g.state = stateReady
		closeOnce(g.ready)
	case stateDraining:
		g.state = stateDraining
		g.drainStart = time.Now()
	default:
		g.state = stateStarting
	}
	return ""
}

// forget removes the state file once every generation is gone.
func (c *Coordinator) forget() {
	c.persistMu.Lock()
	defer c.persistMu.Unlock()
	c.final = true
	_ = os.Remove(c.statePath())
}
