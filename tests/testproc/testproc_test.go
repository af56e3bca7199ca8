package testproc

import (
	"net"
	"os"
	"os/exec"
	"testing"
	"time"
)

func TestWaitFor(t *testing.T) {
	start := time.Now()
	n := 0
	WaitFor(t, 5*time.Second, "the third look", func() bool { n++; return n == 3 })
	if n != 3 {
		t.Errorf("cond called %d times, want 3", n)
	}
	if took := time.Since(start); took < 2*Poll {
		t.Errorf("three looks took %v, want at least two polls of %v", took, Poll)
	}
}

func TestGone(t *testing.T) {
	if Gone(os.Getpid()) {
		t.Error("this process is gone")
	}
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	if !Gone(cmd.Process.Pid) {
		t.Errorf("reaped pid %d is not gone", cmd.Process.Pid)
	}
}

// The child sees the environment InChild gives it, without what it unsets.
func TestInChild(t *testing.T) {
	if !IsChild(t) {
		t.Setenv("TESTPROC_DROPPED", "x")
	}
	if !InChild(t, Child{Env: []string{"TESTPROC_ADDED=y"}, Unset: []string{"TESTPROC_DROPPED"}}) {
		return
	}
	if v := os.Getenv("TESTPROC_ADDED"); v != "y" {
		t.Errorf("TESTPROC_ADDED=%q in the child, want y", v)
	}
	if v, ok := os.LookupEnv("TESTPROC_DROPPED"); ok {
		t.Errorf("TESTPROC_DROPPED=%q reached the child", v)
	}
}

func TestFreeAddr(t *testing.T) {
	addr := FreeAddr(t)
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("listen on the free address %s: %v", addr, err)
	}
	ln.Close()
}
