package main

import (
	"github.com/spf13/cobra"
)

// newCompletionCmd prints cobra's completion scripts; `make install` puts
// them where bash-completion, zsh and fish look.
func newCompletionCmd() *cobra.Command {
	shells := []string{"bash", "zsh", "fish"}
	return &cobra.Command{
		Use:   "completion bash|zsh|fish",
		Short: "Print a shell completion script (bash, zsh or fish)",
		Long: `Print the completion script for a shell: commands, flags, --ready and
--log-format values, and files for CMD. ` + "`make install`" + ` installs all three where
the shells look for them.`,
		Example: `  rollover completion bash > ~/.local/share/bash-completion/completions/rollover
  source <(rollover completion bash)                    # this bash session only
  rollover completion zsh > "${fpath[1]}/_rollover"    # then: compinit
  rollover completion fish > ~/.config/fish/completions/rollover.fish`,
		Annotations: map[string]string{"exit": `  0  ok
  2  usage: no shell, or not bash, zsh or fish`},
		ValidArgs:             shells,
		DisableFlagsInUseLine: true,
		Args: func(c *cobra.Command, args []string) error {
			if len(args) != 1 || (args[0] != "bash" && args[0] != "zsh" && args[0] != "fish") {
				return usageErr("completion takes one shell: bash, zsh or fish")
			}
			return nil
		},
		RunE: func(c *cobra.Command, args []string) error {
			root, out := c.Root(), c.OutOrStdout()
			switch args[0] {
			case "bash":
				return root.GenBashCompletionV2(out, true)
			case "zsh":
				return root.GenZshCompletion(out)
			default:
				return root.GenFishCompletion(out, true)
			}
		},
	}
}
