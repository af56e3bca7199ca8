package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/rollover-sh/rollover/rollover/wire"
)

// client is one request on the control socket.
type client struct {
	conn net.Conn
	r    *wire.Reader
}

func dial(path string) (*client, error) {
	conn, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		if errors.Is(err, syscall.EACCES) {
			// The socket is 0600 in a 0700 directory: another user cannot
			// connect at all, so the coordinator's own uid check never
			// runs. Say what it would have said.
			return nil, &codeError{exitFailed, permissionDenied(path)}
		}
		return nil, &codeError{exitNoCoordinator, fmt.Errorf("no coordinator at %s (is `rollover start` running? pass --name or --socket): %w", path, unwrapSyscall(err))}
	}
	return &client{conn: conn, r: wire.NewReader(conn)}, nil
}

// permissionDenied names the uid that owns the socket (or, when its
// directory is closed to us, the directory).
func permissionDenied(path string) error {
	for _, p := range []string{path, filepath.Dir(path)} {
		if fi, err := os.Stat(p); err == nil {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				return fmt.Errorf("permission denied: uid %d is not the coordinator's uid %d (%s; run as that user or root)", os.Geteuid(), st.Uid, path)
			}
		}
	}
	return fmt.Errorf("permission denied: uid %d cannot open %s (run as the coordinator's user or root)", os.Geteuid(), path)
}

func unwrapSyscall(err error) error {
	var se *os.SyscallError
	if errors.As(err, &se) {
		return se.Err
	}
	return err
}

// do sends m and calls onEvent for each event until the result.
func (c *client) do(m wire.Msg, onEvent func(wire.Event)) (wire.Msg, error) {
	defer c.conn.Close()
	if _, err := c.conn.Write(wire.Encode(m)); err != nil {
		return wire.Msg{}, fmt.Errorf("send request: %w", err)
	}
	for {
		resp, err := c.r.Read()
		if err != nil {
			return wire.Msg{}, fmt.Errorf("coordinator closed the connection before answering: %w", err)
		}
		switch resp.Type {
		case wire.TypeEvent:
			if resp.Event != nil && onEvent != nil {
				onEvent(*resp.Event)
			}
		case wire.TypeResult:
			if !resp.OK {
				code := resp.Code
				if code == 0 {
					code = exitFailed
				}
				return resp, &codeError{code, errors.New(resp.Error)}
			}
			return resp, nil
		}
	}
}

// call sends m to the coordinator the global flags name and calls onEvent
// for each event until the result.
func (g *globals) call(m wire.Msg, onEvent func(wire.Event)) (wire.Msg, error) {
	path, err := g.socketPath()
	if err != nil {
		return wire.Msg{}, err
	}
	return call(path, m, onEvent)
}

// call sends m to the coordinator at path.
func call(path string, m wire.Msg, onEvent func(wire.Event)) (wire.Msg, error) {
	c, err := dial(path)
	if err != nil {
		return wire.Msg{}, err
	}
	return c.do(m, onEvent)
}

// status asks the coordinator the global flags name for its status.
func (g *globals) status() (*wire.Status, error) {
	path, err := g.socketPath()
	if err != nil {
		return nil, err
	}
	return status(path)
}

// status asks the coordinator at path for its status.
func status(path string) (*wire.Status, error) {
	resp, err := call(path, wire.Msg{Type: wire.TypeStatus}, nil)
	if err != nil {
		return nil, err
	}
	if resp.Status == nil {
		return nil, errors.New("coordinator sent no status")
	}
	return resp.Status, nil
}
