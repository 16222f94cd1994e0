package test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/levee-gw/levee/test/harness"
)

// levee config check validates a file as levee serve would, says what it
// would serve, and names the field of a bad one.
func TestConfigCheck(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the levee binary")
	}
	// A list of NATS servers with a password each: the second one's was
	// once printed whole.
	env := []string{"AZURE_PTU_KEY=a", "AZURE_STD_KEY=b", "OPENAI_API_KEY=c", "DATABASE_URL=postgres://u:secret@db/levee",
		"NATS_URL=nats://levee:secret@nats-0:4222,nats://levee:secret@nats-1:4222"}
	p := harness.Spawn(t, env, "config", "check", "../deploy/levee.example.yaml")
	if err := p.Cmd.Wait(); err != nil {
		t.Fatalf("a valid file: %v\n%s", err, p.Output())
	}
	out := p.Output()
	for _, want := range []string{"is valid", "gpt-4o-ptu", "gpt-4o-ptu, gpt-4o-eastus2, gpt-4o-openai", "token issuers: 1",
		"NATS at nats://levee:xxxxx@nats-0:4222,nats://levee:xxxxx@nats-1:4222"} {
		if !strings.Contains(out, want) {
			t.Fatalf("missing %q in:\n%s", want, out)
		}
	}
	if strings.Contains(out, "secret") {
		t.Fatalf("a credential in the output:\n%s", out)
	}
	raw, err := os.ReadFile("../deploy/levee.example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	if err := os.WriteFile(bad, []byte(strings.Replace(string(raw), "tpm: 60000", "tpm: 0", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	p = harness.Spawn(t, env, "config", "check", bad)
	if err := p.Cmd.Wait(); err == nil || !strings.Contains(p.Output(), "deployments[0].tpm") {
		t.Fatalf("a bad file: %v\n%s", err, p.Output())
	}
}
