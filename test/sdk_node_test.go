package test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/dev"
	"github.com/levee-gw/levee/sim"
	"github.com/levee-gw/levee/test/harness"
)

// TestOpenAINodeSDK runs test/sdk-node/check.mjs (the official openai-node
// SDK) against Levee. It needs node and `npm ci` in test/sdk-node, which
// .ci/run does; elsewhere it is skipped, visibly.
func TestOpenAINodeSDK(t *testing.T) {
	node, err := exec.LookPath("node")
	if err != nil {
		t.Skip("node is not installed")
	}
	if _, err := os.Stat(filepath.Join("sdk-node", "node_modules", "openai")); err != nil {
		t.Skip("run `npm ci` in test/sdk-node first (make sdk-node does)")
	}
	f := harness.Fast(dev.DefaultFile())
	for i := range f.Deployments {
		f.Deployments[i].RPM = 1 << 20 // the batch flow is not about rate limits
	}
	// A slow model, so a batch can be cancelled midway.
	f.Deployments = append(f.Deployments, dev.FileDeployment{Name: "slow", Model: "gpt-4o", TPM: 1 << 30, RPM: 1 << 30,
		Sim: sim.Deployment{TTFT: 100 * time.Millisecond, CompletionTokens: 5}})
	f.Models = append(f.Models, config.Model{Name: "gpt-4o-slow", Deployments: []string{"slow"}})
	f.Worker = config.Worker{Concurrency: 4}
	// The same checks with a JWT from an identity provider as the API key.
	idp := newIdP(t)
	f.Auth.OIDC = config.OIDC{Issuers: []config.Issuer{idp.issuer(dev.DevTenant)}}
	env := harness.Start(t, f)
	for _, cred := range []struct{ name, key string }{{"API key", env.APIKey}, {"JWT", idp.token(t, nil)}} {
		t.Run(cred.name, func(t *testing.T) {
			cmd := exec.Command(node, "check.mjs")
			cmd.Dir = "sdk-node"
			cmd.Env = append(os.Environ(), "BASE_URL="+env.BaseURL, "API_KEY="+cred.key)
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("openai-node against Levee: %v\n%s", err, out)
			}
			for _, want := range []string{"openai: ok", "azure: ok", "batch: ok", "cancel: ok", "responses: ok", "background: ok", "background stream: ok", "errors: ok"} {
				if !strings.Contains(string(out), want) {
					t.Fatalf("missing %q in:\n%s", want, out)
				}
			}
		})
	}
}
