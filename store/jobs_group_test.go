package store_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/levee-gw/levee/store"
)

// Concurrent inserts, claims and outcomes share statements; each caller must
// still get exactly its own outcome, and the rollup must add every job once.
func TestGroupedJobStatements(t *testing.T) {
	_, st, _ := migrated(t)
	ctx := context.Background()
	ten, err := st.CreateTenant(ctx, &store.CreateTenantParams{Name: "acme"})
	if err != nil {
		t.Fatal(err)
	}
	const n = 300
	params := func(i int) *store.InsertJobParams {
		p := &store.InsertJobParams{TenantID: ten.ID, Endpoint: "/v1/chat/completions", Model: "gpt-4o",
			Body: fmt.Appendf(nil, `{"model":"gpt-4o","n":%d}`, i%(n/2)), Priority: "low"}
		// Pairs of calls share a key and a body: one job each pair.
		if i%4 < 2 {
			p.IdempotencyKey = fmt.Sprintf("k%d", i/4)
			p.Body = fmt.Appendf(nil, `{"model":"gpt-4o","k":%d}`, i/4)
		}
		return p
	}
	ids := make([]uuid.UUID, n)
	created := make([]bool, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			j, c, err := st.InsertJob(ctx, params(i))
			if err != nil {
				t.Error(err)
				return
			}
			ids[i], created[i] = j.ID, c
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	unique := map[uuid.UUID]bool{}
	nCreated := 0
	for i := range n {
		unique[ids[i]] = true
		if created[i] {
			nCreated++
		}
		if i%4 == 1 && ids[i] != ids[i-1] {
			t.Fatalf("calls %d and %d share an Idempotency-Key but got jobs %s and %s", i-1, i, ids[i-1], ids[i])
		}
	}
	want := n - n/4 // one of each keyed pair
	var stored int
	_ = st.Pool().QueryRow(ctx, `SELECT count(*) FROM jobs`).Scan(&stored)
	if len(unique) != want || nCreated != want || stored != want {
		t.Fatalf("%d distinct jobs, %d created, %d stored; want %d", len(unique), nCreated, stored, want)
	}

	// Claims: every job claimed by exactly one of two concurrent claims.
	var claims sync.Map
	for id := range unique {
		for range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, err := st.StartJob(ctx, id, time.Minute)
				switch {
				case err == nil:
					if _, dup := claims.LoadOrStore(id, true); dup {
						t.Errorf("job %s claimed twice", id)
					}
				case !errors.Is(err, store.ErrJobLeased):
					t.Error(err)
				}
			}()
		}
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	// Outcomes: every job finished by two concurrent calls is applied once.
	var applied sync.Map
	for id := range unique {
		for range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ok, err := st.FinishJob(ctx, &store.FinishJobParams{ID: id, Status: store.JobSucceeded, Deployment: "d", ResultStatus: 200,
					ResultBody: []byte(`{}`), PromptTokens: 3, CompletionTokens: 2, CostNanos: 7, Attempts: 1})
				if err != nil {
					t.Error(err)
					return
				}
				if ok {
					if _, dup := applied.LoadOrStore(id, true); dup {
						t.Errorf("job %s finished twice", id)
					}
				}
			}()
		}
	}
	wg.Wait()
	var requests, prompt, cost, events, succeeded int64
	_ = st.Pool().QueryRow(ctx, `SELECT sum(requests), sum(prompt_tokens), sum(cost_nanos) FROM usage_daily`).Scan(&requests, &prompt, &cost)
	_ = st.Pool().QueryRow(ctx, `SELECT count(*) FROM usage_events`).Scan(&events)
	_ = st.Pool().QueryRow(ctx, `SELECT count(*) FROM jobs WHERE status = 'succeeded'`).Scan(&succeeded)
	if requests != int64(want) || prompt != 3*int64(want) || cost != 7*int64(want) || events != int64(want) || succeeded != int64(want) {
		t.Fatalf("rollup %d requests, %d prompt tokens, %d cost; %d usage rows; %d succeeded; want %d jobs", requests, prompt, cost, events, succeeded, want)
	}
}

// A bulk insert is all or nothing.
func TestInsertJobsIsAllOrNothing(t *testing.T) {
	_, st, _ := migrated(t)
	ctx := context.Background()
	ten, err := st.CreateTenant(ctx, &store.CreateTenantParams{Name: "acme"})
	if err != nil {
		t.Fatal(err)
	}
	job := func(key, body string) *store.InsertJobParams {
		return &store.InsertJobParams{TenantID: ten.ID, Endpoint: "/v1/chat/completions", Model: "gpt-4o", Body: []byte(body), Priority: "low", IdempotencyKey: key}
	}
	res, ok, err := st.InsertJobs(ctx, []*store.InsertJobParams{job("a", `{"a":1}`), job("b", `{"b":1}`)})
	if err != nil || !ok || !res[0].Created || !res[1].Created {
		t.Fatalf("%v %v %+v", ok, err, res)
	}
	// b reused with another body: nothing of this call is stored.
	res2, ok, err := st.InsertJobs(ctx, []*store.InsertJobParams{job("c", `{"c":1}`), job("b", `{"b":2}`), job("a", `{"a":1}`)})
	if err != nil || ok || !errors.Is(res2[1].Err, store.ErrIdempotencyMismatch) || res2[2].Created || res2[2].Job.ID != res[0].Job.ID {
		t.Fatalf("%v %v %+v", ok, err, res2)
	}
	var n int
	_ = st.Pool().QueryRow(ctx, `SELECT count(*) FROM jobs`).Scan(&n)
	if n != 2 {
		t.Fatalf("%d jobs stored, want 2", n)
	}
}
