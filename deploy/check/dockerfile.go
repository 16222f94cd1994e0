package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"time"

	"github.com/moby/buildkit/frontend/dockerfile/parser"
)

const dockerfile = "deploy/Dockerfile"

// dockerfile parses the Dockerfile with BuildKit's own parser and checks
// what an image for production needs: a Go builder stage, a static build,
// a distroless (or scratch) final stage run by a non-root user, levee as
// the entry point; and a .dockerignore that keeps the context small.
func (c *checker) dockerfile() []error {
	raw, err := os.ReadFile(c.path(dockerfile))
	if err != nil {
		return []error{problem{file: dockerfile, msg: err.Error()}}
	}
	errs := dockerfileProblems(dockerfile, raw)
	ignore, err := os.ReadFile(c.path(".dockerignore"))
	if err != nil {
		return append(errs, problem{file: ".dockerignore", msg: err.Error()})
	}
	var lines []string
	sc := bufio.NewScanner(bytes.NewReader(ignore))
	for sc.Scan() {
		lines = append(lines, strings.TrimSpace(sc.Text()))
	}
	for _, want := range []string{".git", "bin", ".levee", "test/sdk-node/node_modules"} {
		if !slices.Contains(lines, want) && !slices.Contains(lines, "/"+want) {
			errs = append(errs, problem{file: ".dockerignore", msg: want + " is not excluded from the build context"})
		}
	}
	return errs
}

// instruction is one Dockerfile instruction.
type instruction struct {
	cmd   string // lower case
	args  []string
	flags []string
	json  bool // exec (JSON array) form
	line  int
}

func dockerfileProblems(file string, raw []byte) []error {
	res, err := parser.Parse(bytes.NewReader(raw))
	if err != nil {
		return []error{problem{file: file, msg: err.Error()}}
	}
	// stages[i] are the instructions of stage i, FROM first.
	var stages [][]instruction
	for _, n := range res.AST.Children {
		in := instruction{cmd: strings.ToLower(n.Value), flags: n.Flags, json: n.Attributes["json"], line: n.StartLine}
		for a := n.Next; a != nil; a = a.Next {
			in.args = append(in.args, a.Value)
		}
		if in.cmd == "from" {
			stages = append(stages, nil)
		}
		if len(stages) == 0 {
			continue // ARG before the first FROM
		}
		stages[len(stages)-1] = append(stages[len(stages)-1], in)
	}
	var errs []error
	add := func(line int, field, format string, args ...any) {
		f := file
		if line > 0 {
			f = fmt.Sprintf("%s:%d", file, line)
		}
		errs = append(errs, problem{file: f, field: field, msg: fmt.Sprintf(format, args...)})
	}
	if len(stages) < 2 {
		add(0, "FROM", "%d stages; want a builder stage and a final one", len(stages))
		return errs
	}
	builder, final := stages[0], stages[len(stages)-1]
	if from := builder[0]; len(from.args) == 0 || !strings.HasPrefix(from.args[0], "golang:1.26") {
		add(from.line, "FROM", "the builder is %v; want golang:1.26", from.args)
	}
	var build *instruction
	for i, in := range builder {
		if in.cmd == "run" && strings.Contains(strings.Join(in.args, " "), "go build") {
			build = &builder[i]
		}
	}
	if build == nil {
		add(0, "RUN", "no `go build` in the builder stage")
	} else {
		cmd := strings.Join(build.args, " ")
		for _, want := range []string{"CGO_ENABLED=0", "-trimpath", `-ldflags "-s -w"`, "./cmd/levee"} {
			if !strings.Contains(cmd, want) {
				add(build.line, "RUN", "go build lacks %s", want)
			}
		}
	}
	if from := final[0]; len(from.args) == 0 || (from.args[0] != "scratch" && !strings.HasPrefix(from.args[0], "gcr.io/distroless/static")) {
		add(from.line, "FROM", "the final stage is %v; want gcr.io/distroless/static-debian12:nonroot or scratch", from.args)
	}
	var user, entrypoint, cmd *instruction
	copied := false
	for i, in := range final {
		switch in.cmd {
		case "user":
			user = &final[i]
		case "entrypoint":
			entrypoint = &final[i]
		case "cmd":
			cmd = &final[i]
		case "copy":
			for _, f := range in.flags {
				copied = copied || strings.HasPrefix(f, "--from=")
			}
		}
	}
	switch {
	case user == nil:
		add(0, "USER", "the final stage sets no user: it would run as root")
	case len(user.args) == 0 || slices.Contains([]string{"root", "0", "root:root", "0:0"}, user.args[0]) || strings.HasPrefix(user.args[0], "0:") || strings.HasPrefix(user.args[0], "root:"):
		add(user.line, "USER", "%v is root", user.args)
	}
	if !copied {
		add(0, "COPY", "the final stage copies nothing from the builder")
	}
	if entrypoint == nil || !entrypoint.json || !slices.Equal(entrypoint.args, []string{"/levee"}) {
		line := 0
		if entrypoint != nil {
			line = entrypoint.line
		}
		add(line, "ENTRYPOINT", `want ["/levee"] (exec form, so signals reach levee for its graceful stop)`)
	}
	if cmd == nil || !cmd.json || len(cmd.args) == 0 || cmd.args[0] != "serve" {
		add(0, "CMD", `want the exec form starting with "serve"`)
	}
	return errs
}

// dockerBuild builds the image where a Docker engine answers, and checks
// that it runs levee as a non-root user; elsewhere it says it skipped.
func (c *checker) dockerBuild() error {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "docker", "info").CombinedOutput(); err != nil {
		reason := strings.TrimSpace(lastLine(string(out)))
		if reason == "" {
			reason = err.Error()
		}
		fmt.Printf("skip  docker build: skipped: no Docker engine (%s)\n", reason)
		return nil
	}
	const tag = "levee:deploy-check"
	build := exec.Command("docker", "build", "-f", c.path(dockerfile), "-t", tag, c.root)
	build.Stdout, build.Stderr = os.Stdout, os.Stderr
	if err := build.Run(); err != nil {
		return err
	}
	out, err := exec.Command("docker", "image", "inspect", "-f", "{{.Config.User}}", tag).Output()
	if err != nil {
		return err
	}
	if u := strings.TrimSpace(string(out)); u == "" || u == "0" || strings.HasPrefix(u, "root") || strings.HasPrefix(u, "0:") {
		return fmt.Errorf("%s runs as user %q", tag, u)
	}
	if out, err := exec.Command("docker", "run", "--rm", tag, "help").CombinedOutput(); err != nil || !bytes.Contains(out, []byte("levee serve")) {
		return fmt.Errorf("docker run %s help: %v: %s", tag, err, out)
	}
	fmt.Printf("ok    docker build %s\n", tag)
	return nil
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}
