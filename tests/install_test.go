package tests

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// The deploy files `make install` puts under $(DATADIR)/rollover/, with
// their rollover paths rendered from BINDIR.
var installedDeploy = []string{
	"systemd/rollover-api.service",
	"systemd/rollover@.service",
	"supervisor/rollover-api.conf",
	"sysctl/90-rollover.conf",
}

// `make install DESTDIR=… PREFIX=/usr` installs the systemd units, the
// supervisord program and the sysctl file under /usr/share/rollover, every
// command line calling /usr/bin/rollover, and the installed units pass
// `systemd-analyze verify`; `make uninstall` takes it all away again.
func TestMakeInstallDeploy(t *testing.T) {
	mk := needTool(t, "make")
	analyze := needTool(t, "systemd-analyze")
	dest := t.TempDir()
	if out, err := exec.Command(mk, "-C", "..", "install", "DESTDIR="+dest, "PREFIX=/usr").CombinedOutput(); err != nil {
		t.Fatalf("make install: %v\n%s", err, out)
	}
	installed := map[string]string{}
	for _, f := range installedDeploy {
		p := filepath.Join(dest, "/usr/share/rollover", f)
		fi, err := os.Stat(p)
		if err != nil {
			t.Errorf("make install did not install %s: %v", f, err)
			continue
		}
		if fi.Mode().Perm() != 0o644 {
			t.Errorf("%s: mode %v, want 0644", p, fi.Mode().Perm())
		}
		raw, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		src, err := os.ReadFile(filepath.Join("../deploy", f))
		if err != nil {
			t.Fatal(err)
		}
		text := string(raw)
		installed[f] = text
		if strings.Contains(text, "/usr/local/bin/rollover") {
			t.Errorf("installed %s still calls /usr/local/bin/rollover, not BINDIR's /usr/bin/rollover", f)
		}
		// Only the path changes: the rest is the shipped file.
		if want := strings.ReplaceAll(string(src), "/usr/local/bin/rollover", "/usr/bin/rollover"); text != want {
			t.Errorf("installed %s differs from deploy/%s beyond the rollover path", f, f)
		}
	}
	for _, f := range []string{"systemd/rollover-api.service", "systemd/rollover@.service"} {
		svc := unitSection(t, installed[f], "Service")
		for _, key := range []string{"ExecStart", "ExecReload"} {
			if !strings.HasPrefix(svc[key], "/usr/bin/rollover ") {
				t.Errorf("installed %s: %s=%q, want /usr/bin/rollover (BINDIR)", f, key, svc[key])
			}
		}
	}
	if !strings.Contains(installed["supervisor/rollover-api.conf"], "command=/usr/bin/rollover start ") {
		t.Errorf("installed supervisor/rollover-api.conf does not run /usr/bin/rollover")
	}

	// verify wants ExecStart's binary at its path (--root does not move
	// that check), so the units it checks call the DESTDIR copy; the app
	// stands in for /usr/local/bin/api, and the template's environment
	// file is a temporary one.
	dir := t.TempDir()
	envDir := filepath.Join(dir, "etc")
	if err := os.Mkdir(envDir, 0o755); err != nil {
		t.Fatal(err)
	}
	demo := filepath.Join(bin, "demoapp")
	if err := os.WriteFile(filepath.Join(envDir, "web.env"), []byte("ROLLOVER_METRICS_ADDR=127.0.0.1:9755\nROLLOVER_COMMAND="+demo+" -addr :8081\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	local := strings.NewReplacer(
		"/usr/bin/rollover ", filepath.Join(dest, "/usr/bin/rollover")+" ",
		"/usr/local/bin/api ", demo+" ",
		"/etc/rollover/%i.env", filepath.Join(envDir, "%i.env"),
	)
	for _, u := range []struct{ file, verify, about string }{
		{"systemd/rollover-api.service", "rollover-api.service", "rollover-api.service"},
		{"systemd/rollover@.service", "rollover@web.service", "rollover@"},
	} {
		unit := local.Replace(installed[u.file])
		if err := os.WriteFile(filepath.Join(dir, filepath.Base(u.file)), []byte(unit), 0o644); err != nil {
			t.Fatal(err)
		}
		// The control: a broken copy must draw a complaint, or verify
		// checks nothing here.
		broken := "broken-" + filepath.Base(u.file)
		if err := os.WriteFile(filepath.Join(dir, broken), []byte(strings.Replace(unit, "[Service]\n", "[Service]\nKillMode=not-a-kill-mode\n", 1)), 0o644); err != nil {
			t.Fatal(err)
		}
		brokenName := "broken-" + u.verify
		out, err := exec.Command(analyze, "verify", filepath.Join(dir, brokenName)).CombinedOutput()
		if about, _ := splitVerifyOutput(out, "broken-"+u.about); len(about) == 0 {
			envProblem(t, "systemd-analyze verify did not complain about a broken unit (%v); it cannot check units here:\n%s", err, out)
		}
		out, err = exec.Command(analyze, "verify", filepath.Join(dir, u.verify)).CombinedOutput()
		about, host := splitVerifyOutput(out, u.about)
		for _, l := range host {
			t.Logf("systemd-analyze (not about the unit): %s", l)
		}
		for _, l := range about {
			t.Errorf("systemd-analyze verify of the installed %s: %s", u.file, l)
		}
		if err != nil && len(about) == 0 {
			envProblem(t, "systemd-analyze verify failed for reasons outside the unit: %v\n%s", err, out)
		}
	}

	if out, err := exec.Command(mk, "-C", "..", "uninstall", "DESTDIR="+dest, "PREFIX=/usr").CombinedOutput(); err != nil {
		t.Fatalf("make uninstall: %v\n%s", err, out)
	}
	_ = filepath.WalkDir(dest, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			t.Errorf("make uninstall left %s", strings.TrimPrefix(p, dest))
		}
		return nil
	})
	if _, err := os.Stat(filepath.Join(dest, "/usr/share/rollover")); err == nil {
		t.Errorf("make uninstall left /usr/share/rollover")
	}
}
