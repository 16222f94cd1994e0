package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"mime"
	"net/http"
	"slices"
	"sort"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"
	"github.com/labstack/echo/v4"

	"github.com/levee-gw/levee/config"
	"github.com/levee-gw/levee/console"
	"github.com/levee-gw/levee/queue"
	"github.com/levee-gw/levee/quota"
	"github.com/levee-gw/levee/store"
	"github.com/levee-gw/levee/strictjson"
)

// The admin API's views for the operator's console, and the console itself.
// Everything here reads state that exists for other reasons (the broker's
// capacity views, the jobs and batches tables, budgets' spend): nothing on a
// call's path changes for it. The console's files are a route group of their
// own under /console, with no middleware beyond the server's; all they do
// they do through /admin/v1 with the operator's admin key.

func (s *Server) consoleRoutes() {
	e, auth, db := s.e, s.authenticateAdmin, s.bounded
	g := "/admin/v1"
	e.GET(g+"/settings", s.adminSettings, auth)
	e.GET(g+"/capacity", s.adminCapacity, auth, db)
	e.GET(g+"/tenants/:tenant/spend", s.adminTenantSpend, auth, db)
	e.GET(g+"/jobs", s.adminListJobs, auth, db)
	e.GET(g+"/jobs/:id", s.adminGetJob, auth, db)
	e.POST(g+"/jobs/:id/cancel", s.adminCancelJob, auth, db)
	e.GET(g+"/batches", s.adminListBatches, auth, db)
	e.GET(g+"/batches/:id", s.adminGetBatch, auth, db)
	e.POST(g+"/batches/:id/cancel", s.adminCancelBatch, auth, db)
	e.GET(g+"/files/:id", s.adminGetFile, auth, db)
	e.GET(g+"/files/:id/content", s.adminFileContent, auth) // streams; bounds its own lookup

	files := echo.WrapHandler(http.StripPrefix("/console", console.Handler()))
	e.GET("/console", func(c echo.Context) error { return c.Redirect(http.StatusMovedPermanently, "/console/") })
	e.GET("/console/*", files)
}

// adminSettings tells an admin client what it may choose from: model
// aliases, deployments, scopes, priorities and the price table's currency.
func (s *Server) adminSettings(c echo.Context) error {
	deps := []string{}
	for _, d := range s.broker.Deployments() {
		deps = append(deps, d.Name)
	}
	return c.JSON(http.StatusOK, map[string]any{"object": "settings", "currency": s.prices.Currency, "models": s.broker.Models(),
		"deployments": deps, "endpoint_groups": config.EndpointGroups, "priorities": config.Priorities, "job_priorities": queue.Priorities,
		"max_grace_seconds": int64(maxGrace / time.Second)})
}

type capacityDeployment struct {
	Name     string `json:"name"`
	Kind     string `json:"kind"`
	Model    string `json:"model"`
	Priority int    `json:"priority"`
	// TPMLimit and RequestsPer10s are the limits; UsedTokens is what the
	// sliding minute holds now (this process's view, shared across
	// processes when capacity sharing is on).
	TPMLimit       int64   `json:"tpm_limit"`
	RequestsPer10s int64   `json:"requests_per_10s_limit"`
	UsedTokens     int64   `json:"used_tokens"`
	SyncReserve    float64 `json:"sync_reserve"`
	HeadroomTokens int64   `json:"headroom_tokens"`
	HeadroomReqs   int64   `json:"headroom_requests"`
	// ChargedSync and ChargedBackground count, since this process started,
	// the tokens of calls it committed of each class: a client takes their
	// differences over time for tokens per minute.
	ChargedSync       int64 `json:"charged_sync_tokens"`
	ChargedBackground int64 `json:"charged_background_tokens"`
	CircuitOpen       bool  `json:"circuit_open"`
	// Upstream429s, 5xx and errors: calls this process moved off the
	// deployment since it started.
	Upstream429s   int64 `json:"upstream_429s"`
	Upstream5xx    int64 `json:"upstream_5xx"`
	UpstreamErrors int64 `json:"upstream_errors"`
}

type capacityQueue struct {
	Priority         string   `json:"priority"`
	Queued           int64    `json:"queued"`
	Running          int64    `json:"running"`
	OldestAgeSeconds *float64 `json:"oldest_age_seconds"`
}

type capacityModel struct {
	Name        string   `json:"name"`
	Deployments []string `json:"deployments"`
	// ChargedBackground sums its deployments' background tokens: its
	// differences over time are the rate workers drain it at.
	ChargedBackground int64           `json:"charged_background_tokens"`
	Queued            int64           `json:"queued"`
	Running           int64           `json:"running"`
	Queues            []capacityQueue `json:"queues"`
}

type capacityTenant struct {
	Tenant  string `json:"tenant"`
	Queued  int64  `json:"queued"`
	Running int64  `json:"running"`
}

// consoleState holds what the capacity view caches.
type consoleState struct {
	mu      sync.Mutex
	at      time.Time
	stats   []store.QueueStat
	pending chan struct{}
}

// queueTTL is how long one read of the queue's depth serves every caller
// of the capacity view: consoles polling each second from many browsers
// cost Postgres one grouped count per second per gateway.
const queueTTL = time.Second

// queueStats returns the open jobs by priority, model and tenant, read at
// most once per queueTTL; concurrent callers share one read.
func (s *Server) queueStats(ctx context.Context) ([]store.QueueStat, error) {
	st := &s.console
	for {
		st.mu.Lock()
		if time.Since(st.at) < queueTTL {
			stats := st.stats
			st.mu.Unlock()
			return stats, nil
		}
		if wait := st.pending; wait != nil {
			st.mu.Unlock()
			select {
			case <-wait:
				continue
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		done := make(chan struct{})
		st.pending = done
		st.mu.Unlock()
		stats, err := s.admin.QueueStats(ctx)
		st.mu.Lock()
		if err == nil {
			st.stats, st.at = stats, time.Now()
		}
		st.pending = nil
		close(done)
		st.mu.Unlock()
		return stats, err
	}
}

// maxCapacityTenants bounds the tenants listed by queue depth; the rest are
// summed as "(other)".
const maxCapacityTenants = 10

// adminCapacity is the live capacity view: per deployment its limits, what
// its sliding minute holds, its reserve and headroom, the tokens charged by
// class and its circuit; per model its queue by priority; the tenants with
// the most queued work.
func (s *Server) adminCapacity(c echo.Context) error {
	stats, err := s.queueStats(c.Request().Context())
	if err != nil {
		return err
	}
	now := time.Now()
	fails := s.broker.Failovers()
	out := struct {
		Object      string               `json:"object"`
		At          int64                `json:"at"`
		Deployments []capacityDeployment `json:"deployments"`
		Models      []*capacityModel     `json:"models"`
		Tenants     []capacityTenant     `json:"tenants"`
	}{Object: "capacity", At: now.UnixMilli(), Deployments: []capacityDeployment{}, Models: []*capacityModel{}, Tenants: []capacityTenant{}}

	background := map[string]int64{}
	for _, d := range s.broker.Deployments() {
		tok, req := d.Capacity.Headroom(now)
		tpm, rp10 := d.Capacity.Limits()
		used, syncTok, bgTok := d.Capacity.Charged(now)
		background[d.Name] = bgTok
		f := fails[d.Name]
		out.Deployments = append(out.Deployments, capacityDeployment{Name: d.Name, Kind: string(d.Kind), Model: d.Model, Priority: d.Priority,
			TPMLimit: tpm, RequestsPer10s: rp10, UsedTokens: used, SyncReserve: d.Capacity.SyncReserve(now), HeadroomTokens: tok, HeadroomReqs: req,
			ChargedSync: syncTok, ChargedBackground: bgTok, CircuitOpen: d.CircuitOpen(),
			Upstream429s: f["429"], Upstream5xx: f["5xx"], UpstreamErrors: f["error"]})
	}
	models := map[string]*capacityModel{}
	for _, name := range s.broker.Models() {
		m := &capacityModel{Name: name, Deployments: []string{}, Queues: []capacityQueue{}}
		if g, ok := s.broker.Resolve(name); ok {
			for _, d := range g.Deployments() {
				m.Deployments = append(m.Deployments, d.Name)
				m.ChargedBackground += background[d.Name]
			}
		}
		models[name] = m
		out.Models = append(out.Models, m)
	}
	type key struct{ model, prio string }
	queues := map[key]*capacityQueue{}
	tenants := map[string]*capacityTenant{}
	for _, st := range stats {
		m := models[st.Model]
		if m == nil {
			// Jobs naming a deployment, or a model a reload removed.
			m = &capacityModel{Name: st.Model, Deployments: []string{}, Queues: []capacityQueue{}}
			models[st.Model] = m
			out.Models = append(out.Models, m)
		}
		m.Queued += st.Queued
		m.Running += st.Running
		q := queues[key{st.Model, st.Priority}]
		if q == nil {
			q = &capacityQueue{Priority: st.Priority}
			queues[key{st.Model, st.Priority}] = q
		}
		q.Queued += st.Queued
		q.Running += st.Running
		if st.Oldest != nil {
			age := now.Sub(*st.Oldest).Seconds()
			if q.OldestAgeSeconds == nil || age > *q.OldestAgeSeconds {
				q.OldestAgeSeconds = &age
			}
		}
		t := tenants[st.Tenant]
		if t == nil {
			t = &capacityTenant{Tenant: st.Tenant}
			tenants[st.Tenant] = t
		}
		t.Queued += st.Queued
		t.Running += st.Running
	}
	// Every model shows every priority, in the order workers serve them.
	for _, m := range out.Models {
		for _, p := range queue.Priorities {
			q := capacityQueue{Priority: p}
			if have := queues[key{m.Name, p}]; have != nil {
				q = *have
			}
			m.Queues = append(m.Queues, q)
		}
	}
	for _, t := range tenants {
		out.Tenants = append(out.Tenants, *t)
	}
	sort.Slice(out.Tenants, func(i, j int) bool {
		a, b := out.Tenants[i], out.Tenants[j]
		if a.Queued+a.Running != b.Queued+b.Running {
			return a.Queued+a.Running > b.Queued+b.Running
		}
		return a.Tenant < b.Tenant
	})
	if len(out.Tenants) > maxCapacityTenants {
		other := capacityTenant{Tenant: "(other)"}
		for _, t := range out.Tenants[maxCapacityTenants:] {
			other.Queued += t.Queued
			other.Running += t.Running
		}
		out.Tenants = append(out.Tenants[:maxCapacityTenants], other)
	}
	c.Response().Header().Set("Cache-Control", "no-store")
	return c.JSON(http.StatusOK, out)
}

type budgetSpendObject struct {
	Object      string        `json:"object"`
	Scope       string        `json:"scope"`
	KeyID       *string       `json:"key_id"`
	KeyName     *string       `json:"key_name"`
	Budget      *budgetObject `json:"budget"`
	PeriodStart int64         `json:"period_start"`
	PeriodEnd   int64         `json:"period_end"`
	// Spent is what the ledger charged this period; Leased is what
	// processes hold to admit calls with (it comes back when unused).
	Spent        json.Number `json:"spent"`
	SpentTokens  int64       `json:"spent_tokens"`
	Leased       json.Number `json:"leased"`
	LeasedTokens int64       `json:"leased_tokens"`
	// UsedRatio is the larger of the money and token shares spent.
	UsedRatio float64 `json:"used_ratio"`
}

// adminTenantSpend lists the tenant's budget and its keys' budgets, each
// with its current period and what was spent in it.
func (s *Server) adminTenantSpend(c echo.Context) error {
	t, err := s.tenantParam(c)
	if err != nil {
		return err
	}
	ctx := c.Request().Context()
	list, err := s.admin.TenantBudgets(ctx, t.ID)
	if err != nil {
		return err
	}
	now := time.Now()
	periods := make([]store.BudgetPeriod, len(list))
	data := make([]budgetSpendObject, len(list))
	for i, b := range list {
		start, end := quota.Period(b.Budget, now)
		periods[i] = store.BudgetPeriod{Budget: b.ID, Start: start}
		data[i] = budgetSpendObject{Object: "budget.period", Scope: "tenant", Budget: renderBudget(&b.Budget), PeriodStart: start.Unix(), PeriodEnd: end.Unix()}
		if b.KeyID != uuid.Nil {
			id, name := b.KeyID.String(), b.KeyName
			data[i].Scope, data[i].KeyID, data[i].KeyName = "key", &id, &name
		}
	}
	spends, err := s.admin.BudgetSpends(ctx, periods)
	if err != nil {
		return err
	}
	for i, b := range list {
		sp := spends[b.ID]
		d := &data[i]
		d.Spent, d.SpentTokens, d.Leased, d.LeasedTokens = money(sp.SpentNanos), sp.SpentTokens, money(sp.LeasedNanos), sp.LeasedTokens
		if b.AmountNanos > 0 {
			d.UsedRatio = float64(sp.SpentNanos) / float64(b.AmountNanos)
		}
		if b.Tokens > 0 {
			d.UsedRatio = max(d.UsedRatio, float64(sp.SpentTokens)/float64(b.Tokens))
		}
	}
	return c.JSON(http.StatusOK, map[string]any{"object": "list", "tenant": t.Name, "currency": s.prices.Currency, "data": data})
}

// tenantFilter resolves the tenant query parameter (an id or a name) as
// tenantParam resolves the path's (uuid.Nil: none given). Only for routes
// without path parameters, whose names it sets.
func (s *Server) tenantFilter(c echo.Context) (uuid.UUID, error) {
	v := c.QueryParam("tenant")
	if v == "" {
		return uuid.Nil, nil
	}
	if len(v) > 64 || !strictjson.ValidText(v) {
		// No tenant has such a name (nor such an id): not worth a query,
		// and Postgres would refuse invalid UTF-8 as an error.
		return uuid.Nil, &Error{Status: http.StatusNotFound, Type: "invalid_request_error", Code: "tenant_not_found", Param: "tenant",
			Message: fmt.Sprintf("No tenant %q.", strictjson.Clip(v))}
	}
	c.SetParamNames("tenant")
	c.SetParamValues(v)
	t, err := s.tenantParam(c)
	if err != nil {
		return uuid.Nil, err
	}
	return t.ID, nil
}

// oneOf reads an optional query parameter that must be one of allowed.
func oneOf(c echo.Context, name string, allowed []string) (string, error) {
	v := c.QueryParam(name)
	if v != "" && !slices.Contains(allowed, v) {
		return "", invalid(name, "invalid_"+name, "%s must be one of %v, not %q.", name, allowed, strictjson.Clip(v))
	}
	return v, nil
}

var jobStatuses = []string{store.JobQueued, store.JobRunning, store.JobSucceeded, store.JobFailed, store.JobCancelled}

// adminJobObject is a job as an admin sees it: whose it is, and (read one
// at a time) the call it carries.
type adminJobObject struct {
	*jobObject
	TenantID   string          `json:"tenant_id"`
	Tenant     string          `json:"tenant"`
	KeyID      *string         `json:"key_id"`
	BatchID    *string         `json:"batch_id"`
	Background bool            `json:"background"`
	LeaseUntil *int64          `json:"lease_until"`
	Body       json.RawMessage `json:"body,omitempty"`
}

func renderAdminJob(j *store.Job, tenant string, withBody bool) *adminJobObject {
	o := &adminJobObject{jobObject: renderJob(j), TenantID: j.TenantID.String(), Tenant: tenant, Background: j.Background,
		LeaseUntil: unix(j.LeaseUntil)}
	if j.KeyID != uuid.Nil {
		k := j.KeyID.String()
		o.KeyID = &k
	}
	if j.BatchID != nil {
		b := batchPrefix + j.BatchID.String()
		o.BatchID = &b
	}
	if withBody {
		o.Body = json.RawMessage(j.Body)
		if !json.Valid(o.Body) {
			o.Body, _ = json.Marshal(string(j.Body))
		}
	} else {
		o.Result = nil // a list reads no results (see store.AdminListJobs)
	}
	return o
}

// adminListJobs lists jobs across tenants, newest first, filtered by tenant
// (id or name), status, priority, model or batch (a batch's lines are
// listed only with batch), in cursor pages (after = the last id).
func (s *Server) adminListJobs(c echo.Context) error {
	limit, after, err := pageParams(c, jobPrefix)
	if err != nil {
		return err
	}
	p := &store.AdminListJobsParams{After: after, Limit: limit}
	if p.Status, err = oneOf(c, "status", jobStatuses); err != nil {
		return err
	}
	if p.Priority, err = oneOf(c, "priority", queue.Priorities); err != nil {
		return err
	}
	if p.Model = c.QueryParam("model"); utf8.RuneCountInString(p.Model) > 256 || !strictjson.ValidText(p.Model) {
		return invalid("model", "invalid_model", "model must be at most 256 characters of text.")
	}
	if v := c.QueryParam("batch"); v != "" {
		id, ok := parsePrefixed(v, batchPrefix)
		if !ok {
			return batchNotFound(v)
		}
		p.BatchID = id
	}
	if p.TenantID, err = s.tenantFilter(c); err != nil {
		return err
	}
	ctx := c.Request().Context()
	jobs, more, err := s.admin.AdminListJobs(ctx, p)
	if err != nil {
		return err
	}
	names, err := tenantNames(ctx, s.admin, jobs, func(j *store.Job) uuid.UUID { return j.TenantID })
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, listResponse(jobs, func(j *store.Job) *adminJobObject { return renderAdminJob(j, names[j.TenantID], false) },
		func(o *adminJobObject) string { return o.ID }, more))
}

// tenantNames names the tenants of a page of items.
func tenantNames[T any](ctx context.Context, st *store.Store, items []T, tenant func(T) uuid.UUID) (map[uuid.UUID]string, error) {
	var ids []uuid.UUID
	for _, it := range items {
		if id := tenant(it); !slices.Contains(ids, id) {
			ids = append(ids, id)
		}
	}
	if len(ids) == 0 {
		return map[uuid.UUID]string{}, nil
	}
	return st.TenantNames(ctx, ids)
}

// adminJob finds the job named in the path, whoever's it is.
func (s *Server) adminJob(c echo.Context) (*store.Job, string, error) {
	id, ok := parsePrefixed(c.Param("id"), jobPrefix)
	if !ok {
		return nil, "", jobNotFound(c.Param("id"))
	}
	ctx := c.Request().Context()
	j, err := s.admin.JobByID(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return nil, "", jobNotFound(c.Param("id"))
	}
	if err != nil {
		return nil, "", err
	}
	name, err := s.admin.TenantName(ctx, j.TenantID)
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		return nil, "", err
	}
	return j, name, nil
}

func (s *Server) adminGetJob(c echo.Context) error {
	j, tenant, err := s.adminJob(c)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, renderAdminJob(j, tenant, true))
}

// adminCancelJob cancels any tenant's job as its tenant's own cancel does.
func (s *Server) adminCancelJob(c echo.Context) error {
	j, tenant, err := s.adminJob(c)
	if err != nil {
		return err
	}
	if j, err = s.admin.CancelJob(c.Request().Context(), j.TenantID, j.ID); err != nil {
		return err
	}
	if j.Status == store.JobSucceeded || j.Status == store.JobFailed {
		return &Error{Status: http.StatusConflict, Type: "invalid_request_error", Code: "job_already_ended",
			Message: fmt.Sprintf("Job %s already %s; it cannot be cancelled.", c.Param("id"), j.Status)}
	}
	if s.queue != nil {
		s.queue.NotifyCancelled(j.ID)
	}
	return c.JSON(http.StatusOK, renderAdminJob(j, tenant, true))
}

// adminBatchObject is a batch and whose it is.
type adminBatchObject struct {
	*batchObject
	TenantID string `json:"tenant_id"`
	Tenant   string `json:"tenant"`
}

var batchStatuses = []string{"validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"}

func (s *Server) adminListBatches(c echo.Context) error {
	limit, after, err := pageParams(c, batchPrefix)
	if err != nil {
		return err
	}
	p := &store.AdminListBatchesParams{After: after, Limit: limit}
	if p.Status, err = oneOf(c, "status", batchStatuses); err != nil {
		return err
	}
	if p.TenantID, err = s.tenantFilter(c); err != nil {
		return err
	}
	ctx := c.Request().Context()
	list, more, err := s.admin.AdminListBatches(ctx, p)
	if err != nil {
		return err
	}
	names, err := tenantNames(ctx, s.admin, list, func(b *store.Batch) uuid.UUID { return b.TenantID })
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, listResponse(list, func(b *store.Batch) *adminBatchObject {
		return &adminBatchObject{batchObject: renderBatch(b), TenantID: b.TenantID.String(), Tenant: names[b.TenantID]}
	}, func(o *adminBatchObject) string { return o.ID }, more))
}

// adminBatch finds the batch named in the path, whoever's it is.
func (s *Server) adminBatch(c echo.Context) (*store.Batch, error) {
	id, ok := parsePrefixed(c.Param("id"), batchPrefix)
	if !ok {
		return nil, batchNotFound(c.Param("id"))
	}
	b, err := s.admin.BatchByID(c.Request().Context(), id)
	if errors.Is(err, store.ErrNotFound) {
		return nil, batchNotFound(c.Param("id"))
	}
	return b, err
}

func (s *Server) renderAdminBatch(ctx context.Context, b *store.Batch) (*adminBatchObject, error) {
	name, err := s.admin.TenantName(ctx, b.TenantID)
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		return nil, err
	}
	return &adminBatchObject{batchObject: renderBatch(b), TenantID: b.TenantID.String(), Tenant: name}, nil
}

func (s *Server) adminGetBatch(c echo.Context) error {
	b, err := s.adminBatch(c)
	if err != nil {
		return err
	}
	o, err := s.renderAdminBatch(c.Request().Context(), b)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, o)
}

// adminCancelBatch cancels any tenant's batch as its tenant's own cancel
// does: unstarted lines at once, running ones finish.
func (s *Server) adminCancelBatch(c echo.Context) error {
	b, err := s.adminBatch(c)
	if err != nil {
		return err
	}
	ctx := c.Request().Context()
	if b, err = s.admin.CancelBatch(ctx, b.TenantID, b.ID); err != nil {
		return err
	}
	o, err := s.renderAdminBatch(ctx, b)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, o)
}

// adminFile finds the file named in the path, whoever's it is.
func (s *Server) adminFile(c echo.Context) (*store.File, error) {
	id, ok := parsePrefixed(c.Param("id"), filePrefix)
	if !ok {
		return nil, fileNotFound(c.Param("id"))
	}
	ctx, cancel := s.dbContext(c.Request().Context())
	defer cancel()
	f, err := s.admin.FileByID(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return nil, fileNotFound(c.Param("id"))
	}
	return f, err
}

func (s *Server) adminGetFile(c echo.Context) error {
	f, err := s.adminFile(c)
	if err != nil {
		return err
	}
	o := struct {
		*fileObject
		TenantID string  `json:"tenant_id"`
		Lines    int     `json:"lines"`
		BatchID  *string `json:"batch_id"`
	}{fileObject: s.renderFile(f), TenantID: f.TenantID.String(), Lines: f.Lines}
	if f.BatchID != nil {
		b := batchPrefix + f.BatchID.String()
		o.BatchID = &b
	}
	return c.JSON(http.StatusOK, o)
}

// adminFileContent streams any tenant's file, as its tenant reads it.
func (s *Server) adminFileContent(c echo.Context) error {
	f, err := s.adminFile(c)
	if err != nil {
		return err
	}
	c.Response().Header().Set("Content-Disposition", mime.FormatMediaType("attachment", map[string]string{"filename": f.Filename}))
	return s.writeFile(c, f)
}
