package config

import (
	"time"

	"errors"
	"strings"
	"testing"
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
