package tests

import (
	"os"
	"regexp"
	"strings"
	"testing"
)

// readmeBlocks are the README's fenced code blocks.
func readmeBlocks(t *testing.T) []string {
	t.Helper()
	raw, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	var blocks []string
	parts := strings.Split(string(raw), "```")
	for i := 1; i < len(parts); i += 2 {
		_, body, _ := strings.Cut(parts[i], "\n") // drop the info string
		blocks = append(blocks, body)
	}
	return blocks
}

// helpSection is the text under title in a --help, up to the next blank
// line, dedented by two spaces.
func helpSection(help, title string) string {
	_, rest, ok := strings.Cut(help, "\n"+title+"\n")
	if !ok {
		return ""
	}
	rest, _, _ = strings.Cut(rest, "\n\n")
	var lines []string
	for _, l := range strings.Split(strings.TrimRight(rest, "\n"), "\n") {
		lines = append(lines, strings.TrimPrefix(l, "  "))
	}
	return strings.Join(lines, "\n")
}

// Every `rollover` command line in the README's code blocks parses with the
// real binary: its command and flags exist and its values are well formed
// (--help right after the command makes it print help instead of running).
func TestReadmeExamplesParse(t *testing.T) {
	n := 0
	for _, block := range readmeBlocks(t) {
		block = strings.ReplaceAll(block, "\\\n", " ")
		for _, line := range strings.Split(block, "\n") {
			line = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(line), "$ "))
			if !strings.HasPrefix(line, "rollover ") {
				continue
			}
			line, _, _ = strings.Cut(line, " #")
			for _, stop := range []string{" > ", " | ", " < "} {
				line, _, _ = strings.Cut(line, stop)
			}
			args := strings.Fields(line)[1:]
			cmd := firstWord(args)
			if cmd == "" || strings.HasPrefix(cmd, "[") {
				t.Errorf("README line %q names no command", line)
				continue
			}
			i := indexOf(args, cmd)
			withHelp := append(append(append([]string{}, args[:i+1]...), "--help"), args[i+1:]...)
			out, stderr, code := rolloverCLI(t, nil, withHelp...)
			if code != 0 || !strings.Contains(out, "Usage:\n  rollover "+cmd) {
				t.Errorf("README's `%s` does not parse: exit %d: %s", line, code, stderr)
			}
			n++
		}
	}
	if n < 15 {
		t.Errorf("only %d rollover command lines found in the README", n)
	}
}

// firstWord is the first argument that is not a global flag or its value.
func firstWord(args []string) string {
	for i := 0; i < len(args); i++ {
		switch a := args[i]; {
		case a == "--name" || a == "--socket":
			i++
		case strings.HasPrefix(a, "-"):
		default:
			return a
		}
	}
	return ""
}

// The README's CLI section says what --help says: the commands, their
// usage lines, the flags of start and next with their defaults, and the
// exit codes.
func TestReadmeCLIMatchesHelp(t *testing.T) {
	blocks := readmeBlocks(t)
	has := func(block string) bool {
		for _, b := range blocks {
			if strings.TrimSpace(b) == strings.TrimSpace(block) {
				return true
			}
		}
		return false
	}
	root, _, _ := rolloverCLI(t, nil, "--help")
	if cmds := "Commands:\n  " + strings.ReplaceAll(helpSection(root, "Commands:"), "\n", "\n  "); !has(cmds) {
		t.Errorf("the README has no block with --help's commands:\n%s", cmds)
	}
	if exits := helpSection(root, "Exit codes:"); !has(exits) {
		t.Errorf("the README has no block with --help's exit codes:\n%s", exits)
	}
	var usage []string
	for _, c := range []string{"start", "next", "status", "rollback", "stop", "promote", "abort", "completion"} {
		help, _, _ := rolloverCLI(t, nil, c, "--help")
		usage = append(usage, helpSection(help, "Usage:"))
	}
	if !has(strings.Join(usage, "\n")) {
		t.Errorf("the README has no block with the usage lines:\n%s", strings.Join(usage, "\n"))
	}

	raw, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	readme := string(raw)
	for _, c := range []string{"start", "next"} {
		help, _, _ := rolloverCLI(t, nil, c, "--help")
		flags := helpSection(help, "Flags:")
		_, table, ok := strings.Cut(readme, "`"+c+"` flags:\n")
		if !ok {
			t.Fatalf("the README has no `%s` flags table", c)
		}
		table, _, _ = strings.Cut(strings.TrimLeft(table, "\n"), "\n\n")
		rows := map[string]string{} // flag -> default column
		for _, row := range strings.Split(table, "\n") {
			cells := strings.Split(row, "|")
			if len(cells) < 4 {
				continue
			}
			for _, f := range regexp.MustCompile("`(--[a-z-]+)`").FindAllStringSubmatch(cells[1], -1) {
				rows[f[1]] = strings.TrimSpace(cells[2])
			}
		}
		for _, m := range regexp.MustCompile(`(?m)^ *(?:-\w, )?(--[a-z-]+)(?: \S+)?\s`).FindAllStringSubmatch(flags, -1) {
			if m[1] == "--help" {
				continue
			}
			def, ok := rows[m[1]]
			if !ok {
				t.Errorf("%s --help has %s, the README's table does not", c, m[1])
				continue
			}
			// The flag's help text runs to the next flag line.
			_, rest, _ := strings.Cut(flags, m[0])
			rest = regexp.MustCompile(`(?m)^ *(-\w, )?--`).Split(rest, 2)[0]
			want := ""
			if d := regexp.MustCompile(`\(default "?([^")]*)"?\)`).FindStringSubmatch(strings.Join(strings.Fields(rest), " ")); d != nil {
				want = d[1]
			}
			if want != "" && c == "start" && def != want {
				t.Errorf("README: %s default %q; start --help says %q", m[1], def, want)
			}
			delete(rows, m[1])
		}
		for f := range rows {
			t.Errorf("the README's %s table has %s, %s --help does not", c, f, c)
		}
	}
}
