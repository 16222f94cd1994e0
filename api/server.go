// Package api owns Levee's HTTP surface: the Echo routes in both the Azure
// OpenAI and the OpenAI shapes, key authentication, request policy, the
// OpenAI error envelope (one handler turns every error into it), and the
// read-only endpoints (models, usage, health, metrics). It hands admitted
// calls to broker and usage to store.
package api

import (
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/labstack/echo/v4"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/levee-gw/levee/batch"
	"github.com/levee-gw/levee/broker"
	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/oidc"
	"github.com/levee-gw/levee/quota"
	"github.com/levee-gw/levee/store"
	"github.com/levee-gw/levee/strictjson"
	"github.com/levee-gw/levee/tracing"
	"github.com/levee-gw/levee/webhook"
)

// UsageRecorder takes usage events off the request path.
type UsageRecorder interface {
	Record(store.UsageEvent)
}

// UsageReader reads a tenant's usage rollup.
type UsageReader interface {
	Usage(ctx context.Context, p *store.UsageParams) ([]store.UsageRow, error)
}

// Pinger reports whether a dependency is reachable.
type Pinger interface {
	Ping(ctx context.Context) error
}

// Options are a Server's dependencies.
type Options struct {
	Config   *config.Config
	Broker   *broker.Broker
	Keys     KeyStore
	Ledger   UsageRecorder
	Usage    UsageReader
	DB       Pinger
	Registry *prometheus.Registry
	Log      *slog.Logger
	// Jobs, Queue and Outbox enable the jobs API and deferred calls (nil: off).
	Jobs   JobStore
	Queue  JobQueue
	Outbox Outbox
	// Wake, if set, tells in-process workers a job was published.
	Wake func()
	// Batches and Runner enable files, batches and webhooks (nil: off).
	Batches *store.Store
	Runner  *batch.Runner
	// Guard checks webhook targets.
	Guard webhook.Guard
	// Quota holds callers' limits and budgets; Prices turn usage into cost.
	Quota  *quota.Quota
	Prices *quota.Prices
	// Admin enables the admin API (/admin/v1/) and token callers' tenants;
	// nil: off.
	Admin *store.Store
	// OIDC verifies JWTs presented as keys; nil: only API keys.
	OIDC *oidc.Verifier
	// Tracer traces calls (nil: off).
	Tracer *tracing.Tracer
}

// Server is the HTTP API.
type Server struct {
	cfg      *config.Config
	broker   *broker.Broker
	keys     *keyCache
	failures *failureLimiter
	ledger   UsageRecorder
	usage    UsageReader
	db       Pinger
	jobs     JobStore
	queue    JobQueue
	outbox   Outbox
	quota    *quota.Quota
	prices   *quota.Prices
	wake     func()
	batches  *store.Store
	runner   *batch.Runner
	uploads  *uploadSlots
	guard    webhook.Guard
	admin    *store.Store
	admins   *adminCache
	oidc     *oidc.Verifier
	tenants  *tenantCache
	used     *lastUse
	// adminUsed notes admin keys' use as used does tenant keys'.
	adminUsed *lastUse
	bus       keyBus
	tracer    *tracing.Tracer
	log       *slog.Logger
	e         *echo.Echo
	metrics   *metrics
	idBase    string
	idSeq     atomic.Uint64

	// console caches what the admin capacity view reads (admin_console.go).
	console consoleState
}

type metrics struct {
	requests     *prometheus.CounterVec
	duration     *prometheus.HistogramVec
	authFailures *prometheus.CounterVec
}

// New builds the API and its routes.
func New(o Options) *Server {
	s := &Server{cfg: o.Config, broker: o.Broker, keys: newKeyCache(o.Keys, o.Config.DatabaseMaxConns/2), failures: newFailureLimiter(o.Config.Auth), ledger: o.Ledger, usage: o.Usage,
		db: o.DB, jobs: o.Jobs, queue: o.Queue, outbox: o.Outbox, quota: o.Quota, prices: o.Prices, wake: o.Wake, batches: o.Batches, runner: o.Runner, guard: o.Guard, log: o.Log,
		uploads: newUploadSlots(o.Config.HTTP.MaxUploadsPerTenant, o.Config.HTTP.MaxUploads, o.Log), idBase: uuid.NewString()[:8] + "-",
		admin: o.Admin, admins: newAdminCache(o.Config.Auth.AdminKey), used: newLastUse(), adminUsed: newLastUse(),
		oidc: o.OIDC, tenants: &tenantCache{m: map[string]tenantEntry{}}, tracer: o.Tracer}
	s.keys.timeout = o.Config.DatabaseTimeout
	s.metrics = &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "levee_requests_total", Help: "Proxied calls by model and final status.",
		}, []string{"model", "status"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "levee_request_duration_seconds", Help: "Time Levee spent on a proxied call, end to end.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2.5, 14),
		}, []string{"model"}),
	}
	s.metrics.authFailures = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "levee_auth_failures_total", Help: "Refused API keys: unknown, or not looked up because the address failed too often.",
	}, []string{"reason"})
	o.Registry.MustRegister(s.metrics.requests, s.metrics.duration, s.metrics.authFailures)

	e := echo.New()
	e.HideBanner, e.HidePort = true, true
	e.HTTPErrorHandler = s.errorHandler
	e.IPExtractor = ipExtractor(o.Config.HTTP)
	e.Use(s.guardConnections)
	if s.tracer.Enabled() {
		e.Use(s.traceRequests)
	}
	s.e = e

	e.GET("/healthz", func(c echo.Context) error { return c.JSON(http.StatusOK, map[string]string{"status": "ok"}) })
	e.GET("/readyz", s.ready)
	e.GET("/metrics", echo.WrapHandler(promhttp.HandlerFor(o.Registry, promhttp.HandlerOpts{})))

	// Auth is attached per route, not with e.Group: a group with middleware
	// registers a catch-all that would turn every 405 into a 404.
	auth, db := s.authenticate, s.bounded
	for _, op := range []broker.Op{broker.OpChat, broker.OpCompletions, broker.OpEmbeddings} {
		scope := s.scope(op.Group())
		e.POST("/openai/deployments/:deployment/"+op.Path(), s.proxyAzure(op), auth, scope)
		e.POST("/openai/v1/"+op.Path(), s.proxyOpenAI(op), auth, scope)
		e.POST("/v1/"+op.Path(), s.proxyOpenAI(op), auth, scope)
	}
	responses := s.scope("responses")
	for _, p := range []string{"/v1/responses", "/openai/v1/responses", "/openai/responses"} {
		e.POST(p, s.proxyOpenAI(broker.OpResponses), auth, responses)
		e.GET(p+"/:id", s.storedResponse(""), auth, responses)
		e.DELETE(p+"/:id", s.storedResponse(""), auth, responses)
		e.GET(p+"/:id/input_items", s.storedResponse("/input_items"), auth, responses)
		e.POST(p+"/:id/cancel", s.cancelResponse, auth, responses, db)
	}
	for _, p := range []string{"/v1/models", "/openai/v1/models", "/openai/models"} {
		e.GET(p, s.models, auth)
		e.GET(p+"/:model", s.model, auth)
	}
	usage, jobs, files, batches, hooks := s.scope("usage"), s.scope("jobs"), s.scope("files"), s.scope("batches"), s.scope("webhooks")
	e.GET("/v1/usage", s.usageHandler, auth, usage, db)
	e.POST("/v1/jobs", s.submitJob, auth, jobs, db)
	e.GET("/v1/jobs", s.listJobs, auth, jobs, db)
	e.GET("/v1/jobs/:id", s.getJob, auth, jobs, db)
	e.POST("/v1/jobs/:id/cancel", s.cancelJob, auth, jobs, db)
	if s.batches != nil {
		for _, p := range []string{"/v1", "/openai", "/openai/v1"} {
			// Uploads and file contents bound their own database work:
			// their clients may rightly take long.
			e.POST(p+"/files", s.uploadFile, auth, files)
			e.GET(p+"/files", s.listFiles, auth, files, db)
			e.GET(p+"/files/:id", s.getFile, auth, files, db)
			e.DELETE(p+"/files/:id", s.deleteFile, auth, files, db)
			e.GET(p+"/files/:id/content", s.fileContent, auth, files)
			e.POST(p+"/batches", s.createBatch, auth, batches, db)
			e.GET(p+"/batches", s.listBatches, auth, batches, db)
			e.GET(p+"/batches/:id", s.getBatch, auth, batches, db)
			e.POST(p+"/batches/:id/cancel", s.cancelBatch, auth, batches, db)
		}
		e.POST("/v1/webhook_endpoints", s.createEndpoint, auth, hooks, db)
		e.GET("/v1/webhook_endpoints", s.listEndpoints, auth, hooks, db)
		e.GET("/v1/webhook_endpoints/:id", s.getEndpoint, auth, hooks, db)
		e.POST("/v1/webhook_endpoints/:id", s.updateEndpoint, auth, hooks, db)
		e.DELETE("/v1/webhook_endpoints/:id", s.deleteEndpoint, auth, hooks, db)
		e.POST("/v1/webhook_endpoints/:id/rotate_secret", s.rotateEndpoint, auth, hooks, db)
		e.GET("/v1/webhook_endpoints/:id/deliveries", s.endpointDeliveries, auth, hooks, db)
		e.POST("/v1/webhook_deliveries/:id/resend", s.resendDelivery, auth, hooks, db)
	}
	if s.admin != nil {
		s.adminRoutes()
	}
	return s
}

// Handler is the root http.Handler.
func (s *Server) Handler() http.Handler { return s.e }

func (s *Server) requestID() string {
	return "req_" + s.idBase + strconv.FormatUint(s.idSeq.Add(1), 36)
}

func (s *Server) ready(c echo.Context) error {
	ctx, cancel := context.WithTimeout(c.Request().Context(), 2*time.Second)
	defer cancel()
	if err := s.db.Ping(ctx); err != nil {
		return &Error{Status: http.StatusServiceUnavailable, Type: "server_error", Code: "not_ready", Message: "Postgres is not reachable.", RetryAfter: time.Second}
	}
	out := map[string]string{"status": "ready", "postgres": "ok"}
	// NATS away does not make a gateway unready: it still serves calls and
	// accepts jobs (the outbox publishes them when NATS is back), and every
	// gateway shares the same NATS, so taking this one out would not help.
	if s.queue != nil {
		out["nats"] = "ok"
		if err := s.queue.Ready(ctx); err != nil {
			out["nats"] = "unreachable"
		}
	}
	return c.JSON(http.StatusOK, out)
}

type modelObject struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	OwnedBy string `json:"owned_by"`
}

// models lists the aliases the caller may use.
func (s *Server) models(c echo.Context) error {
	k := keyOf(c)
	data := []modelObject{}
	for _, m := range s.broker.Models() {
		if k.Scopes.Models == nil || slices.Contains(k.Scopes.Models, m) {
			data = append(data, modelObject{ID: m, Object: "model", OwnedBy: "levee"})
		}
	}
	return c.JSON(http.StatusOK, map[string]any{"object": "list", "data": data})
}

func (s *Server) model(c echo.Context) error {
	name := c.Param("model")
	k := keyOf(c)
	for _, m := range s.broker.Models() {
		if m == name && (k.Scopes.Models == nil || slices.Contains(k.Scopes.Models, m)) {
			return c.JSON(http.StatusOK, modelObject{ID: m, Object: "model", OwnedBy: "levee"})
		}
	}
	return modelNotFound("model", name)
}

type usageLine struct {
	Date             string      `json:"date"`
	Model            string      `json:"model"`
	Requests         int64       `json:"requests"`
	Errors           int64       `json:"errors"`
	PromptTokens     int64       `json:"prompt_tokens"`
	CompletionTokens int64       `json:"completion_tokens"`
	TotalTokens      int64       `json:"total_tokens"`
	Cost             json.Number `json:"cost"`
}

// dateWindow reads start_date and end_date (YYYY-MM-DD, inclusive; default
// the last 30 days).
func dateWindow(c echo.Context) (from, to time.Time, err error) {
	to = time.Now().UTC().Truncate(24 * time.Hour)
	from = to.AddDate(0, 0, -30)
	for _, q := range []struct {
		name string
		dst  *time.Time
	}{{"start_date", &from}, {"end_date", &to}} {
		if v := c.QueryParam(q.name); v != "" {
			t, err := time.Parse(time.DateOnly, v)
			if err != nil {
				return from, to, invalid(q.name, "invalid_date", "%s must be a date as YYYY-MM-DD, not %q.", q.name, strictjson.Clip(v))
			}
			*q.dst = t
		}
	}
	if to.Before(from) {
		return from, to, invalid("end_date", "invalid_date", "end_date is before start_date.")
	}
	return from, to, nil
}

// usageHandler reports the caller's tenant's usage by day and model, from
// start_date to end_date (YYYY-MM-DD, inclusive; default the last 30 days).
func (s *Server) usageHandler(c echo.Context) error {
	k := keyOf(c)
	from, to, err := dateWindow(c)
	if err != nil {
		return err
	}
	p := &store.UsageParams{TenantID: k.TenantID, From: from, To: to}
	rows, err := s.usage.Usage(c.Request().Context(), p)
	if err != nil {
		return err
	}
	data := make([]usageLine, 0, len(rows))
	var total usageLine
	var cost int64
	for _, r := range rows {
		l := usageLine{Date: r.Day.Format(time.DateOnly), Model: r.Model, Requests: r.Requests, Errors: r.Errors,
			PromptTokens: r.PromptTokens, CompletionTokens: r.CompletionTokens, TotalTokens: r.PromptTokens + r.CompletionTokens, Cost: money(r.CostNanos)}
		data = append(data, l)
		total.Requests += l.Requests
		total.Errors += l.Errors
		total.PromptTokens += l.PromptTokens
		total.CompletionTokens += l.CompletionTokens
		total.TotalTokens += l.TotalTokens
		cost += r.CostNanos
	}
	return c.JSON(http.StatusOK, map[string]any{"object": "list", "tenant": k.TenantName, "currency": s.prices.Currency,
		"start_date": p.From.Format(time.DateOnly), "end_date": p.To.Format(time.DateOnly), "data": data,
		"total": map[string]any{"requests": total.Requests, "errors": total.Errors, "prompt_tokens": total.PromptTokens,
			"completion_tokens": total.CompletionTokens, "total_tokens": total.TotalTokens, "cost": money(cost)}})
}
