package store

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// Reads for the admin API's views across tenants (the operator's console):
// jobs and batches of any tenant, files by id, and a tenant's budgets.

// jobSummaryColumns are jobColumns without the two columns that can be
// megabytes (the call's body and its result): a page of 100 jobs stays
// small. They scan into Job.dest like jobColumns, with both left empty.
var jobSummaryColumns = strings.NewReplacer(
	"model, body, priority", "model, NULL::bytea, priority",
	"coalesce(result_status, 0), result_body,", "coalesce(result_status, 0), NULL::bytea,",
).Replace(jobColumns)

// AdminListJobsParams page through jobs across tenants, newest first. Every
// filter is optional; without BatchID a batch's lines are left out (a batch
// of 50,000 lines would bury every other job), with it only its lines are
// listed.
type AdminListJobsParams struct {
	TenantID uuid.UUID
	Status   string
	Priority string
	Model    string
	BatchID  uuid.UUID
	// After is the last id of the previous page.
	After uuid.UUID
	Limit int
}

// filters builds a WHERE clause of only the conditions given, each with
// its argument numbered in turn ($? in cond).
type filters struct {
	where []string
	args  []any
}

func (f *filters) add(cond string, v any) {
	f.args = append(f.args, v)
	f.where = append(f.where, strings.ReplaceAll(cond, "$?", "$"+strconv.Itoa(len(f.args))))
}

// AdminListJobs returns up to Limit jobs, without their bodies and results,
// and whether more follow.
func (s *Store) AdminListJobs(ctx context.Context, p *AdminListJobsParams) ([]*Job, bool, error) {
	// The conditions are written for the filters given only, so the
	// planner sees each query's real shape (a tenant's goes by
	// jobs_tenant) rather than one generic plan full of "$n IS NULL OR".
	var f filters
	arg := f.add
	if p.After != uuid.Nil {
		arg("id < $?", p.After)
	}
	if p.TenantID != uuid.Nil {
		arg("tenant_id = $?", p.TenantID)
	}
	if p.Status != "" {
		arg("status = $?", p.Status)
	}
	if p.Priority != "" {
		arg("priority = $?", p.Priority)
	}
	if p.Model != "" {
		arg("model = $?", p.Model)
	}
	if p.BatchID != uuid.Nil {
		arg("batch_id = $?", p.BatchID)
	} else {
		f.where = append(f.where, "batch_id IS NULL")
	}
	f.args = append(f.args, p.Limit+1)
	q := `SELECT ` + jobSummaryColumns + ` FROM jobs WHERE ` + strings.Join(f.where, " AND ") + ` ORDER BY id DESC LIMIT $` + strconv.Itoa(len(f.args))
	rows, err := s.pool.Query(ctx, q, f.args...)
	if err != nil {
		return nil, false, fmt.Errorf("store: admin list jobs: %w", err)
	}
	out, err := collectJobs(rows)
	if err != nil {
		return nil, false, fmt.Errorf("store: admin list jobs: %w", err)
	}
	out, more := page(out, p.Limit)
	return out, more, nil
}

// TenantNames maps tenant ids to names (deleted tenants' too: their jobs
// and usage still name them). Unknown ids are absent.
func (s *Store) TenantNames(ctx context.Context, ids []uuid.UUID) (map[uuid.UUID]string, error) {
	rows, err := s.pool.Query(ctx, `SELECT id, name FROM tenants WHERE id = ANY($1)`, ids)
	if err != nil {
		return nil, fmt.Errorf("store: tenant names: %w", err)
	}
	out := make(map[uuid.UUID]string, len(ids))
	var id uuid.UUID
	var name string
	_, err = pgx.ForEachRow(rows, []any{&id, &name}, func() error {
		out[id] = name
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("store: tenant names: %w", err)
	}
	return out, nil
}

// AdminListBatchesParams page through batches across tenants, newest first.
type AdminListBatchesParams struct {
	TenantID uuid.UUID
	Status   string
	After    uuid.UUID
	Limit    int
}

// AdminListBatches returns up to Limit batches with live counts, and
// whether more follow.
func (s *Store) AdminListBatches(ctx context.Context, p *AdminListBatchesParams) ([]*Batch, bool, error) {
	f := filters{where: []string{"true"}}
	arg := f.add
	if p.After != uuid.Nil {
		arg("b.id < $?", p.After)
	}
	if p.TenantID != uuid.Nil {
		arg("b.tenant_id = $?", p.TenantID)
	}
	if p.Status != "" {
		arg("b.status = $?", p.Status)
	}
	f.args = append(f.args, p.Limit+1)
	rows, err := s.pool.Query(ctx, `SELECT `+batchColumns+batchFrom+` WHERE `+strings.Join(f.where, " AND ")+
		` ORDER BY b.id DESC LIMIT $`+strconv.Itoa(len(f.args)), f.args...)
	if err != nil {
		return nil, false, fmt.Errorf("store: admin list batches: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (*Batch, error) { return scanBatch(r) })
	if err != nil {
		return nil, false, fmt.Errorf("store: admin list batches: %w", err)
	}
	out, more := page(out, p.Limit)
	return out, more, nil
}

// BatchByID returns any tenant's batch with live counts.
func (s *Store) BatchByID(ctx context.Context, id uuid.UUID) (*Batch, error) {
	return scanBatch(s.pool.QueryRow(ctx, `SELECT `+batchColumns+batchFrom+` WHERE b.id = $1`, id))
}

// FileByID returns any tenant's file.
func (s *Store) FileByID(ctx context.Context, id uuid.UUID) (*File, error) {
	return scanFile(s.pool.QueryRow(ctx, `SELECT `+fileColumns+` FROM files WHERE id = $1`, id))
}

// TenantBudget is a budget of a tenant or of one of its keys (KeyName
// names that key).
type TenantBudget struct {
	Budget
	KeyName string
}

// TenantBudgets lists a tenant's own budget and those of its keys that are
// not revoked, the tenant's first.
func (s *Store) TenantBudgets(ctx context.Context, tenant uuid.UUID) ([]TenantBudget, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+budgetColumns+` FROM budgets
		WHERE tenant_id = $1 AND (key_id IS NULL OR key_id IN (SELECT id FROM api_keys WHERE tenant_id = $1 AND revoked_at IS NULL))
		ORDER BY key_id NULLS FIRST`, tenant)
	if err != nil {
		return nil, fmt.Errorf("store: tenant budgets: %w", err)
	}
	budgets, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Budget, error) { return scanBudget(r) })
	if err != nil {
		return nil, fmt.Errorf("store: tenant budgets: %w", err)
	}
	rows, err = s.pool.Query(ctx, `SELECT id, name FROM api_keys WHERE tenant_id = $1 AND id IN (SELECT key_id FROM budgets WHERE tenant_id = $1)`, tenant)
	if err != nil {
		return nil, fmt.Errorf("store: tenant budgets: %w", err)
	}
	names := map[uuid.UUID]string{}
	var id uuid.UUID
	var name string
	if _, err := pgx.ForEachRow(rows, []any{&id, &name}, func() error { names[id] = name; return nil }); err != nil {
		return nil, fmt.Errorf("store: tenant budgets: %w", err)
	}
	out := make([]TenantBudget, len(budgets))
	for i, b := range budgets {
		out[i] = TenantBudget{Budget: b, KeyName: names[b.KeyID]}
	}
	return out, nil
}
