// Package config owns Levee's one typed configuration: it is read from a YAML
// file (or built in code by `levee dev`), given defaults and validated once at
// start-up, then passed down explicitly. Nothing else reads the environment.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"net/url"
	"os"
	"slices"
	"sort"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// Kind says how a deployment's capacity is bought.
type Kind string

const (
	Provisioned Kind = "provisioned"
	Standard    Kind = "standard"
)

// API says which wire dialect a deployment speaks.
type API string

const (
	// Azure is Azure OpenAI's classic path: /openai/deployments/{name}/...?api-version=.
	Azure API = "azure"
	// OpenAI is any OpenAI-compatible endpoint: {endpoint}/v1/..., model in the body.
	OpenAI API = "openai"
)

// Config is everything a Levee process needs.
type Config struct {
	Listen      string `yaml:"listen"`
	DatabaseURL string `yaml:"database_url"`
	// NATSURL is one NATS server's URL, or several separated by commas (the
	// nodes of a cluster). It may carry a user and password or a token
	// (nats://user:password@host:4222): they are never printed or logged.
	NATSURL string `yaml:"nats_url"`
	// NATSCreds is a NATS .creds file: the user's JWT and its nkey seed,
	// as `nsc` writes it (decentralised JWT authentication).
	NATSCreds string `yaml:"nats_creds"`
	// NATSTLS secures the connection to NATS.
	NATSTLS      NATSTLS `yaml:"nats_tls"`
	MaxBodyBytes int64   `yaml:"max_body_bytes"`
	// ShutdownTimeout bounds how long a graceful stop waits for in-flight calls.
	ShutdownTimeout time.Duration `yaml:"shutdown_timeout"`

	// DatabaseMaxConns sizes the Postgres connection pool of each process.
	DatabaseMaxConns int `yaml:"database_max_conns"`
	// DatabaseTimeout bounds how long a request waits on Postgres (a
	// frozen primary, a failover) before it is answered 503.
	DatabaseTimeout time.Duration `yaml:"database_timeout"`

	HTTP        HTTP         `yaml:"http"`
	Auth        Auth         `yaml:"auth"`
	Usage       Usage        `yaml:"usage"`
	Queue       Queue        `yaml:"queue"`
	Worker      Worker       `yaml:"worker"`
	Webhooks    Webhooks     `yaml:"webhooks"`
	Batches     Batches      `yaml:"batches"`
	Responses   Responses    `yaml:"responses"`
	Retention   Retention    `yaml:"retention"`
	Circuit     Circuit      `yaml:"circuit"`
	Pricing     Pricing      `yaml:"pricing"`
	Deployments []Deployment `yaml:"deployments"`
	Models      []Model      `yaml:"models"`
}

// HTTP bounds what one client can hold of a gateway: a connection that
// sends nothing, a body that trickles in, a tenant's uploads in progress.
type HTTP struct {
	// ReadHeaderTimeout bounds the wait for a request's headers.
	ReadHeaderTimeout time.Duration `yaml:"read_header_timeout"`
	// IdleTimeout closes a kept-alive connection with no request.
	IdleTimeout time.Duration `yaml:"idle_timeout"`
	// BodyTimeout is how long a request body may take before BodyMinRate
	// applies: after it, the body must have arrived at BodyMinRate bytes
	// per second on average, or the request ends with 408.
	BodyTimeout time.Duration `yaml:"body_timeout"`
	BodyMinRate int64         `yaml:"body_min_rate"`
	// MaxUploadsPerTenant caps one tenant's file uploads in progress on
	// one process, MaxUploads all of them (each spools up to 200 MB to
	// disk); more get 429.
	MaxUploadsPerTenant int `yaml:"max_uploads_per_tenant"`
	MaxUploads          int `yaml:"max_uploads"`
	// TrustedProxies are the CIDRs of proxies in front of Levee whose
	// X-Forwarded-For names the client (for per-address limits). Empty:
	// the connection's own address is the client's.
	TrustedProxies []string `yaml:"trusted_proxies"`
}

// Auth bounds failed authentication, per client address.
type Auth struct {
	// FailureRate and FailureBurst form a token bucket of failed key
	// checks per client address (an IPv6 client's /64). Beyond it, keys
	// not known to be valid get 429 without a database lookup; known keys
	// keep working, so one address cannot lock a tenant out.
	FailureRate  float64 `yaml:"failure_rate"`
	FailureBurst int     `yaml:"failure_burst"`
	// AdminKeyEnv names the environment variable whose value, if set, is
	// an admin key (lva-…) every process accepts on /admin/v1/ (default
	// LEVEE_ADMIN_KEY): the bootstrap before any admin key is created.
	AdminKeyEnv string `yaml:"admin_key_env"`
	AdminKey    string `yaml:"-"`
	// OIDC lists the identity providers whose tokens (JWTs) are accepted
	// wherever an API key is.
	OIDC OIDC `yaml:"oidc"`
}

// OIDC is federated authentication: a JWT from a trusted issuer is a
// caller, mapped to a tenant and to scopes by its claims.
type OIDC struct {
	Issuers []Issuer `yaml:"issuers"`
	// Leeway is the clock skew allowed on exp, nbf and iat (default 60s).
	Leeway time.Duration `yaml:"leeway"`
	// RefetchInterval bounds how often a key set is fetched again because a
	// token names a key it lacks (default 1m, at least 1s): a flood of
	// tokens with made-up kids costs the identity provider one fetch per
	// interval.
	RefetchInterval time.Duration `yaml:"refetch_interval"`
}

// Issuer is one trusted identity provider (for Entra ID, one per token
// version: their iss differs).
type Issuer struct {
	// Issuer is the exact iss a token must carry.
	Issuer string `yaml:"issuer"`
	// JWKSURL is where its signing keys are; empty: discovered from
	// Issuer's /.well-known/openid-configuration (jwks_uri).
	JWKSURL string `yaml:"jwks_url"`
	// Audiences: a token's aud must contain one of them.
	Audiences []string `yaml:"audiences"`
	// Algorithms accepted (default RS256, ES256, EdDSA). none and HMAC
	// are never accepted, whatever is listed.
	Algorithms []string `yaml:"algorithms"`
	// TenantClaim names the claim that says whose the caller is (tid,
	// azp, appid, a group claim…); Tenants maps its values to tenant names
	// (empty: the value is the tenant's name). A string claim or an array
	// of strings: the first value that maps wins.
	TenantClaim string            `yaml:"tenant_claim"`
	Tenants     map[string]string `yaml:"tenants"`
	// Grants give scopes by claims; a call of a token must fit one grant
	// it matches whole (endpoint, model and priority together). No grants
	// listed: every token of the issuer may do all its tenant may. Grants
	// listed and none matched: refused (403).
	Grants []Grant `yaml:"grants"`
}

// Grant is a scope given to tokens whose Claim holds Value (a string
// equal to it, or an array containing it); an empty Claim matches every
// token of the issuer.
type Grant struct {
	Claim string `yaml:"claim"`
	Value string `yaml:"value"`
	// Models (aliases), Endpoints (groups: chat, completions, embeddings,
	// responses, jobs, batches, files, usage, webhooks) and MaxPriority
	// (high, normal, low) as for API keys; empty: no restriction.
	Models      []string `yaml:"models"`
	Endpoints   []string `yaml:"endpoints"`
	MaxPriority string   `yaml:"max_priority"`
}

// EndpointGroups are what a key or token may be scoped to.
var EndpointGroups = []string{"chat", "completions", "embeddings", "responses", "jobs", "batches", "files", "usage", "webhooks"}

// Priorities, highest first, as a key or token may be capped at.
var Priorities = []string{"high", "normal", "low"}

// Usage tunes the ledger writer that takes usage rows off the request path.
type Usage struct {
	FlushInterval time.Duration `yaml:"flush_interval"`
	BatchSize     int           `yaml:"batch_size"`
	BufferSize    int           `yaml:"buffer_size"`
	// MaxPending bounds rows held in memory while Postgres is unreachable.
	MaxPending int `yaml:"max_pending"`
}

// Queue configures the JetStream job queue (needs nats_url).
type Queue struct {
	// Replicas of the jobs stream: 3 on a three-node cluster.
	Replicas int           `yaml:"replicas"`
	AckWait  time.Duration `yaml:"ack_wait"`
	// Domain is the JetStream domain that holds the jobs stream (empty:
	// the one of the server Levee connects to).
	Domain string `yaml:"domain"`
	// MaxAttempts is how many failed upstream attempts end a job as failed.
	MaxAttempts int `yaml:"max_attempts"`
	// Backoff is the redelivery delay after each failed attempt (the last
	// one repeats); jittered ±20 %.
	Backoff []time.Duration `yaml:"backoff"`
	// DefaultWait and MaxWait bound how long a deferred synchronous call
	// (a low-priority call to a synchronous endpoint) holds its connection
	// (Prefer: wait=N picks within them).
	DefaultWait time.Duration `yaml:"default_wait"`
	MaxWait     time.Duration `yaml:"max_wait"`
	// ConsumerIdle is how long a (priority, model, tenant) consumer may go
	// unused before JetStream removes it; the next job for it creates it
	// again. Without it every tenant that ever queued a job would keep
	// three consumers per model forever.
	ConsumerIdle time.Duration `yaml:"consumer_idle"`
}

// Retention bounds how long finished work stays in Postgres. A duration of
// 0 takes the default; a negative one keeps that kind forever.
type Retention struct {
	// Interval is how often each process sweeps (default 1m).
	Interval time.Duration `yaml:"interval"`
	// Jobs: a finished job outside a batch, with its result (default 720h).
	Jobs time.Duration `yaml:"jobs"`
	// Batches: an ended batch, its jobs and its output and error files
	// (default 720h, as OpenAI keeps batch output).
	Batches time.Duration `yaml:"batches"`
	// Uploads: an uploaded file that set no expires_after (default 720h:
	// OpenAI's default for purpose=batch).
	Uploads time.Duration `yaml:"uploads"`
	// Webhooks: delivered deliveries and their events (default 720h);
	// FailedWebhooks: failed ones (default 2160h).
	Webhooks       time.Duration `yaml:"webhooks"`
	FailedWebhooks time.Duration `yaml:"failed_webhooks"`
	// UsageMonths: months of raw usage events kept besides the current one
	// (default 13; -1: forever); the daily rollup is kept.
	UsageMonths int `yaml:"usage_months"`
	// BatchSize is the most rows one delete takes (default 1000).
	BatchSize int `yaml:"batch_size"`
}

// Batches configures the Batch API.
type Batches struct {
	// PinDeployments sends a batch line whose body.model names a deployment
	// (Azure style) to that deployment only. By default it goes to every
	// deployment of that deployment's model group, to use all spare capacity.
	PinDeployments bool `yaml:"pin_deployments"`
}

// Responses configures the Responses API.
type Responses struct {
	// Retention is how long Levee remembers which deployment stores a
	// response (for follow-ups, reads and deletes); OpenAI keeps stored
	// responses 30 days (default 720h).
	Retention time.Duration `yaml:"retention"`
	// StreamRetention is how long a streamed background response's events
	// are kept after it ended, for clients that reconnect (default 24h).
	StreamRetention time.Duration `yaml:"stream_retention"`
}

// Webhooks configures outgoing webhooks.
type Webhooks struct {
	// AllowLoopback and AllowPrivate open the SSRF guard (levee dev allows
	// loopback so a local receiver works).
	AllowLoopback bool `yaml:"allow_loopback"`
	AllowPrivate  bool `yaml:"allow_private"`
	// Schedule is the delay before each retry (default: Standard Webhooks'
	// 5s, 5m, 30m, 2h, 5h, 10h, 14h, 20h, 24h).
	Schedule []time.Duration `yaml:"schedule"`
}

// Worker configures the queue workers.
type Worker struct {
	// Enabled runs workers inside `levee serve` too (levee dev always does;
	// `levee worker` runs only them).
	Enabled bool `yaml:"enabled"`
	// Concurrency bounds the calls one process's workers have in flight.
	Concurrency int `yaml:"concurrency"`
	// SyncReserve is the default reserve of each deployment: what workers
	// leave to synchronous traffic (default auto).
	SyncReserve SyncReserve `yaml:"sync_reserve"`
	// SyncReserveFloor and SyncReserveCap bound an automatic reserve, as
	// shares of each deployment's limits.
	SyncReserveFloor float64 `yaml:"sync_reserve_floor"`
	SyncReserveCap   float64 `yaml:"sync_reserve_cap"`
}

// Pricing turns usage into cost. Every cost and money budget is in
// Currency.
type Pricing struct {
	Currency string  `yaml:"currency"`
	Prices   []Price `yaml:"prices"`
}

// Price is what tokens cost on a deployment, or on every deployment of a
// model, per million tokens.
type Price struct {
	// Match is a deployment name or a deployment model; a deployment's own
	// entry wins over its model's.
	Match       string   `yaml:"match"`
	Input       float64  `yaml:"input"`
	CachedInput *float64 `yaml:"cached_input"` // default: input
	Output      float64  `yaml:"output"`
	// BatchDiscount multiplies the cost of batch lines (0.5 for half
	// price); default 1.
	BatchDiscount float64 `yaml:"batch_discount"`
}

// Circuit tunes the per-deployment circuit breaker.
type Circuit struct {
	// Failures is how many consecutive failures open the circuit.
	Failures int `yaml:"failures"`
	// OpenFor is the first cool-down; it doubles on each failed probe up to MaxOpenFor.
	OpenFor    time.Duration `yaml:"open_for"`
	MaxOpenFor time.Duration `yaml:"max_open_for"`
}

// Deployment is one model deployment Levee may send calls to.
type Deployment struct {
	Name     string `yaml:"name"`
	Model    string `yaml:"model"`
	API      API    `yaml:"api"`
	Endpoint string `yaml:"endpoint"`
	// APIVersion is sent as ?api-version= on Azure deployments.
	APIVersion string `yaml:"api_version"`
	// UpstreamName is the deployment (Azure) or model (OpenAI) name upstream
	// knows; it defaults to Name.
	UpstreamName string `yaml:"upstream_name"`
	// CredentialEnv names the environment variable holding the key. Keys are
	// never written inline in a config file.
	CredentialEnv string `yaml:"credential_env"`
	// Credential is filled from CredentialEnv at load (or set by `levee dev`).
	Credential string `yaml:"-"`

	Kind     Kind   `yaml:"kind"`
	TPM      int    `yaml:"tpm"`
	RPM      int    `yaml:"rpm"`
	Region   string `yaml:"region"`
	Priority int    `yaml:"priority"`
	Weight   int    `yaml:"weight"`
	// Timeout bounds the wait for upstream response headers (time to first byte).
	Timeout time.Duration `yaml:"timeout"`
	// Encoding is the tokenizer used for estimates; derived from Model when empty.
	Encoding string `yaml:"encoding"`
	// SyncReserve is what of its TPM and RPM queue workers leave free for
	// synchronous calls: auto or a fixed share (default worker.sync_reserve).
	SyncReserve SyncReserve `yaml:"sync_reserve"`
}

// Model is an alias clients use as `model` (or as the Azure deployment in the
// path), the deployments that serve it, and the policy applied to its calls.
type Model struct {
	Name        string   `yaml:"name"`
	Deployments []string `yaml:"deployments"`
	// MaxTokens is the ceiling on max_tokens / max_completion_tokens; 0 = none.
	MaxTokens int `yaml:"max_tokens"`
	// DefaultMaxTokens is what a call that sets no max_tokens is charged
	// for, and sent with (see MaxTokensParam).
	DefaultMaxTokens int `yaml:"default_max_tokens"`
	// MaxTokensParam is how a chat call that sets no ceiling is sent with
	// DefaultMaxTokens: max_completion_tokens (the default: OpenAI's and
	// Azure's current name, required by reasoning models), max_tokens (for
	// endpoints that know only that), or none (sent as it came: the
	// deployment may then generate more than was charged, past tenant
	// limits and budgets until the call ends).
	MaxTokensParam string `yaml:"max_tokens_param"`
	// MaxN and MaxBestOf cap n and best_of; 0 means 1.
	MaxN      int `yaml:"max_n"`
	MaxBestOf int `yaml:"max_best_of"`
}

// Defaults used by Validate for zero fields.
const (
	DefaultListen           = "127.0.0.1:8080"
	DefaultMaxBodyBytes     = 8 << 20
	DefaultAPIVersion       = "2024-10-21"
	DefaultDefaultMaxTokens = 1024
	// DefaultDatabaseMaxConns: no request path holds a connection while it
	// waits on a client, so a small pool serves many calls.
	DefaultDatabaseMaxConns = 16
)

// Load reads a YAML file, fills credentials from the environment, applies
// defaults and validates. Unknown fields are errors: a typo must not be silently
// ignored in a file that controls money.
func Load(path string, getenv func(string) string) (*Config, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return Parse(raw, getenv)
}

// Parse is Load for bytes already in memory.
func Parse(raw []byte, getenv func(string) string) (*Config, error) {
	var c Config
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("config: %w", err)
	}
	if c.DatabaseURL == "" {
		c.DatabaseURL = getenv("DATABASE_URL")
	}
	if c.NATSURL == "" {
		c.NATSURL = getenv("NATS_URL")
	}
	if c.Auth.AdminKeyEnv == "" {
		c.Auth.AdminKeyEnv = "LEVEE_ADMIN_KEY"
	}
	c.Auth.AdminKey = getenv(c.Auth.AdminKeyEnv)
	for i := range c.Deployments {
		d := &c.Deployments[i]
		if d.CredentialEnv != "" {
			d.Credential = getenv(d.CredentialEnv)
			if d.Credential == "" {
				return nil, fmt.Errorf("config: deployments[%d].credential_env: environment variable %s is empty", i, d.CredentialEnv)
			}
		}
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

// FieldError names the config field that is wrong.
type FieldError struct {
	Field string
	Msg   string
}

func (e *FieldError) Error() string { return "config: " + e.Field + ": " + e.Msg }

// Validate fills defaults and checks every field, returning a *FieldError for
// the first problem.
func (c *Config) Validate() error {
	if err := c.Retention.validate(); err != nil {
		return err
	}
	if c.Responses.Retention == 0 {
		c.Responses.Retention = 30 * 24 * time.Hour
	}
	if c.Responses.Retention < time.Minute {
		return &FieldError{"responses.retention", "must be at least 1m"}
	}
	if c.Responses.StreamRetention == 0 {
		c.Responses.StreamRetention = 24 * time.Hour
	}
	if c.Responses.StreamRetention < time.Minute {
		return &FieldError{"responses.stream_retention", "must be at least 1m"}
	}
	if c.Listen == "" {
		c.Listen = DefaultListen
	}
	if c.MaxBodyBytes == 0 {
		c.MaxBodyBytes = DefaultMaxBodyBytes
	}
	if c.MaxBodyBytes < 1024 {
		return &FieldError{"max_body_bytes", "must be at least 1024"}
	}
	if c.DatabaseMaxConns == 0 {
		c.DatabaseMaxConns = DefaultDatabaseMaxConns
	}
	if c.DatabaseMaxConns < 2 {
		return &FieldError{"database_max_conns", "must be at least 2"}
	}
	if c.DatabaseTimeout == 0 {
		c.DatabaseTimeout = 10 * time.Second
	}
	if c.DatabaseTimeout < 100*time.Millisecond {
		return &FieldError{"database_timeout", "must be at least 100ms"}
	}
	if err := c.HTTP.validate(); err != nil {
		return err
	}
	if c.Auth.FailureRate == 0 {
		c.Auth.FailureRate = 5
	}
	if c.Auth.FailureBurst == 0 {
		c.Auth.FailureBurst = 50
	}
	if c.Auth.FailureRate < 0 || c.Auth.FailureBurst < 1 {
		return &FieldError{"auth.failure_rate", "failure_rate must be > 0 and failure_burst >= 1"}
	}
	if err := c.Auth.OIDC.validate(); err != nil {
		return err
	}
	if k := c.Auth.AdminKey; k != "" && (!strings.HasPrefix(k, "lva-") || len(k) < 24) {
		return &FieldError{"auth.admin_key_env", fmt.Sprintf("$%s must be an admin key: lva- and at least 20 more characters", c.Auth.AdminKeyEnv)}
	}
	if c.ShutdownTimeout == 0 {
		c.ShutdownTimeout = 30 * time.Second
	}
	if c.Usage.FlushInterval == 0 {
		c.Usage.FlushInterval = 200 * time.Millisecond
	}
	if c.Usage.BatchSize == 0 {
		c.Usage.BatchSize = 1000
	}
	if c.Usage.BufferSize == 0 {
		c.Usage.BufferSize = 8192
	}
	if c.Usage.MaxPending == 0 {
		c.Usage.MaxPending = 500_000
	}
	if c.Circuit.Failures == 0 {
		c.Circuit.Failures = 3
	}
	if c.Circuit.OpenFor == 0 {
		c.Circuit.OpenFor = 500 * time.Millisecond
	}
	if c.Circuit.MaxOpenFor == 0 {
		c.Circuit.MaxOpenFor = 5 * time.Second
	}
	if err := c.validateNATS(); err != nil {
		return err
	}
	if c.Queue.Replicas == 0 {
		c.Queue.Replicas = 1
	}
	if c.Queue.Replicas < 0 || c.Queue.Replicas > 5 {
		return &FieldError{"queue.replicas", "must be between 1 and 5"}
	}
	if c.Queue.AckWait == 0 {
		c.Queue.AckWait = 30 * time.Second
	}
	if c.Queue.AckWait < time.Second {
		return &FieldError{"queue.ack_wait", "must be at least 1s"}
	}
	if c.Queue.MaxAttempts == 0 {
		c.Queue.MaxAttempts = 5
	}
	if len(c.Queue.Backoff) == 0 {
		c.Queue.Backoff = []time.Duration{time.Second, 5 * time.Second, 30 * time.Second, 2 * time.Minute}
	}
	if c.Queue.DefaultWait == 0 {
		c.Queue.DefaultWait = 60 * time.Second
	}
	if c.Queue.MaxWait == 0 {
		c.Queue.MaxWait = 10 * time.Minute
	}
	if c.Queue.DefaultWait > c.Queue.MaxWait {
		return &FieldError{"queue.default_wait", "must not exceed queue.max_wait"}
	}
	if c.Queue.ConsumerIdle == 0 {
		c.Queue.ConsumerIdle = time.Hour
	}
	if c.Queue.ConsumerIdle < time.Second {
		return &FieldError{"queue.consumer_idle", "must be at least 1s"}
	}
	if c.Worker.Concurrency == 0 {
		c.Worker.Concurrency = 256
	}
	if c.Worker.SyncReserve == 0 {
		c.Worker.SyncReserve = AutoReserve
	}
	if !c.Worker.SyncReserve.valid() {
		return &FieldError{"worker.sync_reserve", "must be auto or in (0, 1)"}
	}
	if c.Worker.SyncReserveFloor == 0 {
		c.Worker.SyncReserveFloor = DefaultSyncReserveFloor
	}
	if c.Worker.SyncReserveCap == 0 {
		c.Worker.SyncReserveCap = DefaultSyncReserveCap
	}
	if c.Worker.SyncReserveFloor < 0 || c.Worker.SyncReserveFloor >= 1 {
		return &FieldError{"worker.sync_reserve_floor", "must be in [0, 1)"}
	}
	if c.Worker.SyncReserveCap < c.Worker.SyncReserveFloor || c.Worker.SyncReserveCap >= 1 {
		return &FieldError{"worker.sync_reserve_cap", "must be in [sync_reserve_floor, 1)"}
	}
	if len(c.Deployments) == 0 {
		return &FieldError{"deployments", "at least one deployment is required"}
	}
	names := map[string]int{}
	for i := range c.Deployments {
		d := &c.Deployments[i]
		f := func(name string) string { return fmt.Sprintf("deployments[%d].%s", i, name) }
		if d.Name == "" {
			return &FieldError{f("name"), "required"}
		}
		if _, dup := names[d.Name]; dup {
			return &FieldError{f("name"), fmt.Sprintf("%q is used twice", d.Name)}
		}
		names[d.Name] = i
		if d.Model == "" {
			return &FieldError{f("model"), "required"}
		}
		if d.API == "" {
			d.API = Azure
		}
		if d.API != Azure && d.API != OpenAI {
			return &FieldError{f("api"), fmt.Sprintf("%q: must be azure or openai", d.API)}
		}
		u, err := url.Parse(d.Endpoint)
		if d.Endpoint == "" || err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return &FieldError{f("endpoint"), fmt.Sprintf("%q: must be an http(s) URL", d.Endpoint)}
		}
		d.Endpoint = strings.TrimRight(d.Endpoint, "/")
		if d.APIVersion == "" {
			d.APIVersion = DefaultAPIVersion
		}
		if d.UpstreamName == "" {
			d.UpstreamName = d.Name
		}
		if d.Credential == "" {
			return &FieldError{f("credential_env"), "required: name the environment variable holding the key"}
		}
		if d.Kind == "" {
			d.Kind = Standard
		}
		if d.Kind != Provisioned && d.Kind != Standard {
			return &FieldError{f("kind"), fmt.Sprintf("%q: must be provisioned or standard", d.Kind)}
		}
		if d.TPM <= 0 {
			return &FieldError{f("tpm"), "must be > 0"}
		}
		if d.RPM == 0 {
			// Azure grants 6 requests per minute per 1,000 TPM.
			d.RPM = max(6*d.TPM/1000, 1)
		}
		if d.RPM < 0 {
			return &FieldError{f("rpm"), "must be > 0"}
		}
		if d.Priority < 0 {
			return &FieldError{f("priority"), "must be >= 0"}
		}
		if d.Weight == 0 {
			d.Weight = 1
		}
		if d.Weight < 0 {
			return &FieldError{f("weight"), "must be > 0"}
		}
		if d.Timeout == 0 {
			d.Timeout = 60 * time.Second
		}
		if d.Encoding == "" {
			d.Encoding = EncodingFor(d.Model)
		}
		if d.SyncReserve == 0 {
			d.SyncReserve = c.Worker.SyncReserve
		}
		if !d.SyncReserve.valid() {
			return &FieldError{f("sync_reserve"), "must be auto or in (0, 1)"}
		}
		if d.Encoding != "o200k_base" && d.Encoding != "cl100k_base" {
			return &FieldError{f("encoding"), fmt.Sprintf("%q: must be o200k_base or cl100k_base", d.Encoding)}
		}
	}
	if err := c.Pricing.validate(c.Deployments); err != nil {
		return err
	}
	// A model group per distinct deployment model is implied, so a config that
	// lists only deployments still works with model names as aliases.
	aliases := map[string]bool{}
	for i := range c.Models {
		m := &c.Models[i]
		f := func(name string) string { return fmt.Sprintf("models[%d].%s", i, name) }
		if m.Name == "" {
			return &FieldError{f("name"), "required"}
		}
		if aliases[m.Name] {
			return &FieldError{f("name"), fmt.Sprintf("%q is used twice", m.Name)}
		}
		aliases[m.Name] = true
		if len(m.Deployments) == 0 {
			return &FieldError{f("deployments"), "at least one deployment is required"}
		}
		for j, dn := range m.Deployments {
			if _, ok := names[dn]; !ok {
				return &FieldError{fmt.Sprintf("models[%d].deployments[%d]", i, j), fmt.Sprintf("unknown deployment %q", dn)}
			}
		}
		if m.MaxTokens < 0 {
			return &FieldError{f("max_tokens"), "must be >= 0"}
		}
		if m.DefaultMaxTokens == 0 {
			m.DefaultMaxTokens = DefaultDefaultMaxTokens
			if m.MaxTokens > 0 && m.MaxTokens < m.DefaultMaxTokens {
				m.DefaultMaxTokens = m.MaxTokens
			}
		}
		if m.MaxN == 0 {
			m.MaxN = 1
		}
		if m.MaxBestOf == 0 {
			m.MaxBestOf = 1
		}
		switch m.MaxTokensParam {
		case "", "max_completion_tokens", "max_tokens", "none":
		default:
			return &FieldError{f("max_tokens_param"), "must be max_completion_tokens, max_tokens or none"}
		}
		if m.MaxN < 0 || m.MaxBestOf < 0 || m.DefaultMaxTokens < 0 {
			return &FieldError{f("max_n"), "limits must be >= 0"}
		}
	}
	var implied []string
	for _, d := range c.Deployments {
		if !aliases[d.Model] {
			implied = append(implied, d.Model)
			aliases[d.Model] = true
		}
	}
	sort.Strings(implied)
	for _, name := range implied {
		m := Model{Name: name, DefaultMaxTokens: DefaultDefaultMaxTokens, MaxN: 1, MaxBestOf: 1}
		for _, d := range c.Deployments {
			if d.Model == name {
				m.Deployments = append(m.Deployments, d.Name)
			}
		}
		c.Models = append(c.Models, m)
	}
	return nil
}

func (p *Pricing) validate(ds []Deployment) error {
	if p.Currency == "" {
		p.Currency = "USD"
	}
	if len(p.Currency) != 3 || strings.ToUpper(p.Currency) != p.Currency {
		return &FieldError{"pricing.currency", fmt.Sprintf("%q: must be an ISO 4217 code such as USD", p.Currency)}
	}
	known := map[string]bool{}
	for _, d := range ds {
		known[d.Name], known[d.Model] = true, true
	}
	seen := map[string]bool{}
	for i := range p.Prices {
		pr := &p.Prices[i]
		f := func(name string) string { return fmt.Sprintf("pricing.prices[%d].%s", i, name) }
		switch {
		case !known[pr.Match]:
			return &FieldError{f("match"), fmt.Sprintf("%q is neither a deployment nor a deployment's model", pr.Match)}
		case seen[pr.Match]:
			return &FieldError{f("match"), fmt.Sprintf("%q is priced twice", pr.Match)}
		case pr.Input < 0 || pr.Output < 0 || (pr.CachedInput != nil && *pr.CachedInput < 0):
			return &FieldError{f("input"), "prices must be >= 0"}
		}
		seen[pr.Match] = true
		if pr.CachedInput == nil {
			in := pr.Input
			pr.CachedInput = &in
		}
		if pr.BatchDiscount == 0 {
			pr.BatchDiscount = 1
		}
		if pr.BatchDiscount < 0 || pr.BatchDiscount > 1 {
			return &FieldError{f("batch_discount"), "must be in (0, 1]"}
		}
	}
	return nil
}

func (h *HTTP) validate() error {
	if h.ReadHeaderTimeout == 0 {
		h.ReadHeaderTimeout = 10 * time.Second
	}
	if h.IdleTimeout == 0 {
		h.IdleTimeout = 120 * time.Second
	}
	if h.BodyTimeout == 0 {
		h.BodyTimeout = 10 * time.Second
	}
	if h.BodyMinRate == 0 {
		h.BodyMinRate = 16 << 10
	}
	if h.MaxUploadsPerTenant == 0 {
		h.MaxUploadsPerTenant = 4
	}
	if h.MaxUploads == 0 {
		h.MaxUploads = 32
	}
	switch {
	case h.ReadHeaderTimeout < 0 || h.IdleTimeout < 0 || h.BodyTimeout < 0:
		return &FieldError{"http", "timeouts must be > 0"}
	case h.BodyMinRate < 1:
		return &FieldError{"http.body_min_rate", "must be at least 1 byte per second"}
	case h.MaxUploadsPerTenant < 1:
		return &FieldError{"http.max_uploads_per_tenant", "must be at least 1"}
	case h.MaxUploads < h.MaxUploadsPerTenant:
		return &FieldError{"http.max_uploads", "must be at least http.max_uploads_per_tenant"}
	}
	for i, p := range h.TrustedProxies {
		if _, err := netip.ParsePrefix(p); err != nil {
			return &FieldError{fmt.Sprintf("http.trusted_proxies[%d]", i), fmt.Sprintf("%q: must be a CIDR such as 10.0.0.0/8", p)}
		}
	}
	return nil
}

func (r *Retention) validate() error {
	if r.Interval == 0 {
		r.Interval = time.Minute
	}
	if r.Interval < time.Second {
		return &FieldError{"retention.interval", "must be at least 1s"}
	}
	const month = 30 * 24 * time.Hour
	for _, d := range []struct {
		v   *time.Duration
		def time.Duration
	}{{&r.Jobs, month}, {&r.Batches, month}, {&r.Uploads, month}, {&r.Webhooks, month}, {&r.FailedWebhooks, 3 * month}} {
		if *d.v == 0 {
			*d.v = d.def
		}
	}
	if r.UsageMonths == 0 {
		r.UsageMonths = 13
	}
	if r.BatchSize == 0 {
		r.BatchSize = 1000
	}
	if r.BatchSize < 1 || r.BatchSize > 100_000 {
		return &FieldError{"retention.batch_size", "must be in [1, 100000]"}
	}
	return nil
}

// EncodingFor maps a model name to its tokenizer encoding (protocols.md §7).
func EncodingFor(model string) string {
	m := strings.ToLower(model)
	for _, p := range []string{"gpt-4o", "gpt-4.1", "gpt-5", "o1", "o3", "o4", "chatgpt-4o"} {
		if strings.HasPrefix(m, p) {
			return "o200k_base"
		}
	}
	return "cl100k_base"
}

// allowedAlgorithms are the JWS algorithms a trusted issuer may use: no
// none, no HMAC (a public key must never double as a shared secret).
var allowedAlgorithms = []string{"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}

func (o *OIDC) validate() error {
	if o.Leeway == 0 {
		o.Leeway = time.Minute
	}
	if o.Leeway < 0 || o.Leeway > 10*time.Minute {
		return &FieldError{"auth.oidc.leeway", "must be between 0 and 10m"}
	}
	if o.RefetchInterval == 0 {
		o.RefetchInterval = time.Minute
	}
	if o.RefetchInterval < time.Second || o.RefetchInterval > time.Hour {
		return &FieldError{"auth.oidc.refetch_interval", "must be between 1s and 1h"}
	}
	seen := map[string]bool{}
	for i := range o.Issuers {
		is := &o.Issuers[i]
		f := func(name string) string { return fmt.Sprintf("auth.oidc.issuers[%d].%s", i, name) }
		u, err := url.Parse(is.Issuer)
		if is.Issuer == "" || err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
			return &FieldError{f("issuer"), "must be the issuer's URL, exactly as its tokens' iss"}
		}
		if seen[is.Issuer] {
			return &FieldError{f("issuer"), "listed twice"}
		}
		seen[is.Issuer] = true
		if is.JWKSURL != "" {
			if u, err := url.Parse(is.JWKSURL); err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
				return &FieldError{f("jwks_url"), "must be an http(s) URL"}
			}
		}
		if len(is.Audiences) == 0 {
			return &FieldError{f("audiences"), "at least one audience is required: a token meant for another application must not be accepted"}
		}
		if len(is.Algorithms) == 0 {
			is.Algorithms = []string{"RS256", "ES256", "EdDSA"}
		}
		for _, a := range is.Algorithms {
			if !slices.Contains(allowedAlgorithms, a) {
				return &FieldError{f("algorithms"), fmt.Sprintf("%q is not accepted (one of %s)", a, strings.Join(allowedAlgorithms, ", "))}
			}
		}
		if is.TenantClaim == "" {
			return &FieldError{f("tenant_claim"), "required: the claim that names the caller's tenant (e.g. tid)"}
		}
		for j, g := range is.Grants {
			gf := func(name string) string { return fmt.Sprintf("auth.oidc.issuers[%d].grants[%d].%s", i, j, name) }
			if (g.Claim == "") != (g.Value == "") {
				return &FieldError{gf("claim"), "claim and value go together (both empty: every token)"}
			}
			for _, e := range g.Endpoints {
				if !slices.Contains(EndpointGroups, e) {
					return &FieldError{gf("endpoints"), fmt.Sprintf("%q is not one of %s", e, strings.Join(EndpointGroups, ", "))}
				}
			}
			if g.MaxPriority != "" && !slices.Contains(Priorities, g.MaxPriority) {
				return &FieldError{gf("max_priority"), "must be high, normal or low"}
			}
		}
	}
	return nil
}
