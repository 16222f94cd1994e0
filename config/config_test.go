package config

import (
	"errors"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
)

func env(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

const good = `
listen: 127.0.0.1:9000
database_url: postgres://x
deployments:
  - name: ptu
    model: gpt-4o
    endpoint: https://example.openai.azure.com/
    credential_env: PTU_KEY
    kind: provisioned
    tpm: 60000
  - name: std
    model: gpt-4o
    api: openai
    endpoint: http://127.0.0.1:8000
    credential_env: STD_KEY
    tpm: 120000
    rpm: 100
    priority: 1
models:
  - name: gpt-4o
    deployments: [ptu, std]
    max_tokens: 4096
`

func TestParseGoodConfig(t *testing.T) {
	c, err := Parse([]byte(good), env(map[string]string{"PTU_KEY": "k1", "STD_KEY": "k2"}))
	if err != nil {
		t.Fatal(err)
	}
	ptu := c.Deployments[0]
	if ptu.Credential != "k1" || ptu.RPM != 360 || ptu.Endpoint != "https://example.openai.azure.com" || ptu.Encoding != "o200k_base" || ptu.API != Azure {
		t.Fatalf("defaults not applied: %+v", ptu)
	}
	if c.Deployments[1].RPM != 100 || c.Models[0].DefaultMaxTokens != 1024 || c.Models[0].MaxN != 1 {
		t.Fatalf("%+v %+v", c.Deployments[1], c.Models[0])
	}
}

func TestInvalidConfigNamesTheField(t *testing.T) {
	keys := env(map[string]string{"PTU_KEY": "k1", "STD_KEY": "k2"})
	for _, tc := range []struct {
		name, from, to, field string
	}{
		{"tpm", "tpm: 60000", "tpm: 0", "deployments[0].tpm"},
		{"kind", "kind: provisioned", "kind: reserved", "deployments[0].kind"},
		{"endpoint", "https://example.openai.azure.com/", "ftp://x", "deployments[0].endpoint"},
		{"api", "api: openai", "api: grpc", "deployments[1].api"},
		{"duplicate", "name: std", "name: ptu", "deployments[1].name"},
		{"unknown deployment in model", "[ptu, std]", "[ptu, nope]", "models[0].deployments[1]"},
		{"missing env", "PTU_KEY", "NOT_SET", "deployments[0].credential_env"},
		{"unknown field", "tpm: 120000", "tpms: 120000", "tpms"},
		{"negative priority", "priority: 1", "priority: -1", "deployments[1].priority"},
		{"trusted proxy not a CIDR", "listen:", "http: {trusted_proxies: [10.0.0.1]}\nlisten:", "http.trusted_proxies[0]"},
		{"body rate", "listen:", "http: {body_min_rate: -1}\nlisten:", "http.body_min_rate"},
		{"pool", "listen:", "database_max_conns: 1\nlisten:", "database_max_conns"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(strings.Replace(good, tc.from, tc.to, 1)), keys)
			if err == nil || !strings.Contains(err.Error(), tc.field) {
				t.Fatalf("error %v does not name %s", err, tc.field)
			}
		})
	}
	_, err := Parse([]byte("listen: x\n"), keys)
	var fe *FieldError
	if !errors.As(err, &fe) || fe.Field != "deployments" {
		t.Fatalf("empty config: %v", err)
	}
}

func TestImpliedModelGroups(t *testing.T) {
	c, err := Parse([]byte(strings.Replace(good, "models:\n  - name: gpt-4o\n    deployments: [ptu, std]\n    max_tokens: 4096\n", "", 1)), env(map[string]string{"PTU_KEY": "a", "STD_KEY": "b"}))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Models) != 1 || c.Models[0].Name != "gpt-4o" || len(c.Models[0].Deployments) != 2 {
		t.Fatalf("implied groups %+v", c.Models)
	}
}

func TestExampleConfigIsValid(t *testing.T) {
	c, err := Load("../deploy/levee.example.yaml", env(map[string]string{
		"AZURE_PTU_KEY": "a", "AZURE_STD_KEY": "b", "OPENAI_API_KEY": "c", "DATABASE_URL": "postgres://x"}))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Deployments) != 4 || len(c.Models) != 2 || c.DatabaseURL != "postgres://x" {
		t.Fatalf("%+v", c)
	}
	if c.HTTP.BodyMinRate != 16384 || c.HTTP.MaxUploadsPerTenant != 4 || c.Auth.FailureBurst != 50 || c.DatabaseMaxConns != 16 {
		t.Fatalf("%+v %+v %d", c.HTTP, c.Auth, c.DatabaseMaxConns)
	}
	if len(c.Auth.OIDC.Issuers) != 1 || len(c.Auth.OIDC.Issuers[0].Grants) != 2 || c.Responses.Retention != 720*time.Hour {
		t.Fatalf("%+v %+v", c.Auth.OIDC, c.Responses)
	}
	if !c.Worker.SyncReserve.Auto() || c.Worker.SyncReserveFloor != 0.02 || c.Worker.SyncReserveCap != 0.5 || !c.Deployments[0].SyncReserve.Auto() {
		t.Fatalf("reserve %v floor %v cap %v, deployment %v", c.Worker.SyncReserve, c.Worker.SyncReserveFloor, c.Worker.SyncReserveCap, c.Deployments[0].SyncReserve)
	}
}

func TestSyncReserve(t *testing.T) {
	const deps = "deployments:\n  - {name: a, model: gpt-4o, endpoint: 'http://127.0.0.1:1', credential_env: K, tpm: 1000}\n  - {name: b, model: gpt-4o, endpoint: 'http://127.0.0.1:1', credential_env: K, tpm: 1000, sync_reserve: 0.3}\n"
	keys := env(map[string]string{"K": "k"})
	for _, tc := range []struct {
		name, worker string
		want         [2]SyncReserve // deployments a and b
		floor, cap   float64
		err          string
	}{
		{"default: auto", "", [2]SyncReserve{AutoReserve, 0.3}, 0.02, 0.5, ""},
		{"auto spelled out, with bounds", "worker: {sync_reserve: auto, sync_reserve_floor: 0.05, sync_reserve_cap: 0.4}\n", [2]SyncReserve{AutoReserve, 0.3}, 0.05, 0.4, ""},
		{"a fixed default", "worker: {sync_reserve: 0.2}\n", [2]SyncReserve{0.2, 0.3}, 0.02, 0.5, ""},
		{"a share of 1", "worker: {sync_reserve: 1}\n", [2]SyncReserve{}, 0, 0, "worker.sync_reserve"},
		{"a negative share", "worker: {sync_reserve: -0.1}\n", [2]SyncReserve{}, 0, 0, "sync_reserve"},
		{"a word", "worker: {sync_reserve: adaptive}\n", [2]SyncReserve{}, 0, 0, "sync_reserve"},
		{"a cap below the floor", "worker: {sync_reserve_floor: 0.1, sync_reserve_cap: 0.05}\n", [2]SyncReserve{}, 0, 0, "worker.sync_reserve_cap"},
		{"a floor of 1", "worker: {sync_reserve_floor: 1}\n", [2]SyncReserve{}, 0, 0, "worker.sync_reserve_floor"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse([]byte(tc.worker+deps), keys)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err %v, want one naming %s", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := [2]SyncReserve{c.Deployments[0].SyncReserve, c.Deployments[1].SyncReserve}; got != tc.want {
				t.Errorf("reserves %v, want %v", got, tc.want)
			}
			if c.Worker.SyncReserveFloor != tc.floor || c.Worker.SyncReserveCap != tc.cap {
				t.Errorf("floor %v cap %v, want %v %v", c.Worker.SyncReserveFloor, c.Worker.SyncReserveCap, tc.floor, tc.cap)
			}
		})
	}
	if out, _ := yaml.Marshal(struct{ R SyncReserve }{AutoReserve}); !strings.Contains(string(out), "auto") {
		t.Errorf("auto marshals as %q", out)
	}
}

func TestRestartOnly(t *testing.T) {
	base := func() *Config {
		c, err := Parse([]byte(`listen: ":8080"
deployments:
  - {name: a, model: gpt-4o, endpoint: "http://127.0.0.1:1", credential_env: K, tpm: 1000, rpm: 10}
models:
  - {name: gpt-4o, deployments: [a]}
`), func(k string) string {
			if k == "K" {
				return "secret"
			}
			return ""
		})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	for _, tc := range []struct {
		name string
		edit func(*Config)
		want []string
	}{
		{"nothing", func(*Config) {}, nil},
		{"deployments, models, prices and circuit reload", func(c *Config) {
			c.Deployments[0].TPM = 2000
			c.Models[0].MaxTokens = 10
			c.Circuit.Failures = 9
			c.Pricing.Prices = append(c.Pricing.Prices, Price{Match: "gpt-4o"})
		}, nil},
		{"listen and nested fields need a restart", func(c *Config) {
			c.Listen = ":9090"
			c.HTTP.IdleTimeout = 1
			c.Queue.Replicas = 3
		}, []string{"listen", "http.idle_timeout", "queue.replicas"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			next := base()
			tc.edit(next)
			got := RestartOnly(base(), next)
			if strings.Join(got, ",") != strings.Join(tc.want, ",") {
				t.Fatalf("RestartOnly = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestRedactNATSURL(t *testing.T) {
	for in, want := range map[string]string{
		"nats://a:4222":                                          "nats://a:4222",
		"nats://levee:s3cret@a:4222":                             "nats://levee:xxxxx@a:4222",
		"nats://tok3n@a:4222, tls://b:4222/":                     "nats://xxxxx@a:4222,tls://b:4222",
		"levee:s3cret@a:4222,nats://u:p4ss@b:4222,nats://c:4222": "nats://levee:xxxxx@a:4222,nats://u:xxxxx@b:4222,nats://c:4222",
		"nats://u:s3cret@a:bad":                                  "(unparsable)",
	} {
		if got := RedactNATSURL(in); got != want {
			t.Errorf("RedactNATSURL(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestNATSSettingsAreChecked(t *testing.T) {
	keys := env(map[string]string{"PTU_KEY": "k1", "STD_KEY": "k2"})
	dir := t.TempDir()
	for _, tc := range []struct {
		name, extra, field string
	}{
		{"a port that is not one", "nats_url: nats://levee:s3cret@a:4222,nats://levee:s3cret@b:x\n", "nats_url"},
		{"a scheme NATS does not speak", "nats_url: http://levee:s3cret@a:4222\n", "nats_url"},
		{"creds without a server", "nats_creds: " + dir + "/x.creds\n", "nats_creds"},
		{"a creds file that is not there", "nats_url: nats://a:4222\nnats_creds: " + dir + "/x.creds\n", "nats_creds"},
		{"a CA file that is not there", "nats_url: tls://a:4222\nnats_tls: {ca_file: " + dir + "/ca.pem}\n", "nats_tls.ca_file"},
		{"a certificate without its key", "nats_url: tls://a:4222\nnats_tls: {cert_file: " + dir + "/c.pem}\n", "nats_tls.cert_file"},
		{"a domain that is not one token", "nats_url: nats://a:4222\nqueue: {domain: hub.eu}\n", "queue.domain"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.extra+good), keys)
			var fe *FieldError
			if !errors.As(err, &fe) || fe.Field != tc.field {
				t.Fatalf("error %v does not name %s", err, tc.field)
			}
			if strings.Contains(err.Error(), "s3cret") {
				t.Fatalf("the error shows the password: %v", err)
			}
		})
	}
	c, err := Parse([]byte("nats_url: nats://levee:s3cret@a:4222, b:4222\nqueue: {domain: hub, replicas: 3}\n"+good), keys)
	if err != nil || c.Queue.Domain != "hub" || len(NATSServers(c.NATSURL)) != 2 {
		t.Fatalf("%v %+v", err, c)
	}
}
