package test

import (
	"encoding/json"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/levee-gw/levee/test/harness"
)

// The admin endpoints the console is built on, attacked as every endpoint
// is: without a key or with a tenant's, with ids that are malformed,
// unknown or another tenant's, and with oversized or invalid parameters.
// Every answer is the envelope with the right status, never a 500, and a
// filter never lets another tenant's rows through.
func TestConsoleAdminAPI(t *testing.T) {
	env := harness.Start(t, nil)
	newTenant(t, env, "ta")
	tbID := newTenant(t, env, "tb")
	ka := newAPIKey(t, env, "ta", map[string]any{"name": "a-key", "budget": map[string]any{"tokens": 1_000_000, "period": "day"}})
	kb := newAPIKey(t, env, "tb", nil)
	resp, raw := adminCall(t, env, "POST", "/admin/v1/tenants/ta", map[string]any{"budget": map[string]any{"tokens": 5_000_000, "period": "month"}})
	wantCode(t, "a budget for ta", resp, raw, 200, "")

	var ja, jb []string
	for range 3 {
		_, j := submit(t, env, ka.Secret, jobBody(5, "low"))
		ja = append(ja, j.ID)
	}
	for range 2 {
		_, j := submit(t, env, kb.Secret, jobBody(5, "normal"))
		jb = append(jb, j.ID)
	}
	for _, id := range ja {
		waitJob(t, env, ka.Secret, id, 20*time.Second)
	}
	for _, id := range jb {
		waitJob(t, env, kb.Secret, id, 20*time.Second)
	}
	file := uploadFile(t, env, kb.Secret, batchLines(5, "b"))
	resp, raw = call(t, env.BaseURL, "/v1/batches", kb.Secret, map[string]any{"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
	wantCode(t, "tb's batch", resp, raw, 200, "")
	var batch struct {
		ID string `json:"id"`
	}
	_ = json.Unmarshal(raw, &batch)
	done := waitBatch(t, env, kb.Secret, batch.ID, "completed")
	var finished struct {
		OutputFileID string `json:"output_file_id"`
	}
	_ = json.Unmarshal(done, &finished)

	t.Run("admin keys only", func(t *testing.T) {
		for _, r := range [][2]string{
			{"GET", "/admin/v1/settings"}, {"GET", "/admin/v1/capacity"}, {"GET", "/admin/v1/tenants/ta/spend"},
			{"GET", "/admin/v1/jobs"}, {"GET", "/admin/v1/jobs/" + ja[0]}, {"POST", "/admin/v1/jobs/" + ja[0] + "/cancel"},
			{"GET", "/admin/v1/batches"}, {"GET", "/admin/v1/batches/" + batch.ID}, {"POST", "/admin/v1/batches/" + batch.ID + "/cancel"},
			{"GET", "/admin/v1/files/" + file}, {"GET", "/admin/v1/files/" + file + "/content"},
		} {
			for _, key := range []string{"", ka.Secret} {
				resp, raw := callAs(t, r[0], env.BaseURL+r[1], key, nil)
				wantCode(t, r[0]+" "+r[1]+" without an admin key", resp, raw, 401, "invalid_admin_key")
			}
		}
	})

	listJobs := func(t *testing.T, query string) (ids []string, tenants []string, more bool, last string) {
		t.Helper()
		resp, raw := adminCall(t, env, "GET", "/admin/v1/jobs?"+query, nil)
		wantCode(t, "list jobs "+query, resp, raw, 200, "")
		var l struct {
			Data []struct {
				ID     string `json:"id"`
				Tenant string `json:"tenant"`
				Body   any    `json:"body"`
				Result any    `json:"result"`
			} `json:"data"`
			HasMore bool    `json:"has_more"`
			LastID  *string `json:"last_id"`
		}
		if err := json.Unmarshal(raw, &l); err != nil {
			t.Fatalf("list jobs: %s", raw)
		}
		for _, d := range l.Data {
			if d.Body != nil || d.Result != nil {
				t.Fatalf("a list carries bodies or results: %s", raw)
			}
			ids, tenants = append(ids, d.ID), append(tenants, d.Tenant)
		}
		return ids, tenants, l.HasMore, deref(l.LastID)
	}
	sameSet := func(a, b []string) bool {
		a, b = slices.Clone(a), slices.Clone(b)
		slices.Sort(a)
		slices.Sort(b)
		return slices.Equal(a, b)
	}

	t.Run("jobs: filters hold and pages walk", func(t *testing.T) {
		ids, tenants, _, _ := listJobs(t, "tenant=ta")
		if !sameSet(ids, ja) || slices.ContainsFunc(tenants, func(s string) bool { return s != "ta" }) {
			t.Fatalf("tenant=ta: %v of %v", ids, tenants)
		}
		ids, _, _, _ = listJobs(t, "tenant="+tbID)
		if !sameSet(ids, jb) {
			t.Fatalf("tenant=<tb's id>: %v, want %v", ids, jb)
		}
		ids, _, _, _ = listJobs(t, "tenant=ta&priority=normal")
		if len(ids) != 0 {
			t.Fatalf("ta's normal jobs: %v (its jobs are low)", ids)
		}
		ids, _, _, _ = listJobs(t, "tenant=ta&batch="+batch.ID)
		if len(ids) != 0 {
			t.Fatalf("ta's lines of tb's batch: %v", ids)
		}
		ids, tenants, _, _ = listJobs(t, "batch="+batch.ID)
		if len(ids) != 5 || slices.ContainsFunc(tenants, func(s string) bool { return s != "tb" }) {
			t.Fatalf("the batch's lines: %v of %v", ids, tenants)
		}
		// Every job, one per page, newest first, none twice; batch lines
		// are not among them.
		var walked []string
		after := ""
		for range 20 {
			ids, _, more, last := listJobs(t, "limit=1&after="+after)
			walked = append(walked, ids...)
			if !more {
				break
			}
			after = last
		}
		if !sameSet(walked, append(slices.Clone(ja), jb...)) {
			t.Fatalf("pages walked: %v", walked)
		}
		for i := 1; i < len(walked); i++ {
			if walked[i] >= walked[i-1] {
				t.Fatalf("not newest first: %v", walked)
			}
		}
	})

	t.Run("jobs: bad parameters and ids", func(t *testing.T) {
		long := strings.Repeat("x", 5000)
		for _, c := range []struct {
			query  string
			status int
			code   string
		}{
			{"status=bogus", 400, "invalid_status"},
			{"priority=high", 400, "invalid_priority"},
			{"limit=0", 400, "invalid_limit"},
			{"limit=101", 400, "invalid_limit"},
			{"limit=1e3", 400, "invalid_limit"},
			{"after=garbage", 400, "invalid_cursor"},
			{"after=" + strings.TrimPrefix(ja[0], "job_"), 400, "invalid_cursor"},
			{"tenant=nobody", 404, "tenant_not_found"},
			{"tenant=" + uuid.NewString(), 404, "tenant_not_found"},
			{"tenant=" + long, 404, "tenant_not_found"},
			{"tenant=%00", 404, "tenant_not_found"},
			{"tenant=%ff%fe", 404, "tenant_not_found"},
			{"model=" + strings.Repeat("m", 300), 400, "invalid_model"},
			{"model=%00", 400, "invalid_model"},
			{"batch=garbage", 404, "batch_not_found"},
		} {
			resp, raw := adminCall(t, env, "GET", "/admin/v1/jobs?"+c.query, nil)
			wantCode(t, "jobs?"+c.query[:min(len(c.query), 40)], resp, raw, c.status, c.code)
			if len(raw) > 600 {
				t.Fatalf("jobs?%s: the error quotes too much (%d bytes)", c.query[:40], len(raw))
			}
		}
		for _, id := range []string{"garbage", "job_garbage", "job_" + uuid.NewString(), strings.TrimPrefix(ja[0], "job_"), "batch_" + strings.TrimPrefix(ja[0], "job_"),
			url.PathEscape("job_" + strings.Repeat("9", 3000))} {
			resp, raw := adminCall(t, env, "GET", "/admin/v1/jobs/"+id, nil)
			wantCode(t, "job "+id[:min(len(id), 40)], resp, raw, 404, "job_not_found")
			resp, raw = adminCall(t, env, "POST", "/admin/v1/jobs/"+id+"/cancel", nil)
			wantCode(t, "cancel job "+id[:min(len(id), 40)], resp, raw, 404, "job_not_found")
		}
		resp, raw := adminCall(t, env, "GET", "/admin/v1/jobs/"+jb[0], nil)
		wantCode(t, "tb's job", resp, raw, 200, "")
		var j struct {
			Tenant   string          `json:"tenant"`
			TenantID string          `json:"tenant_id"`
			Status   string          `json:"status"`
			Body     json.RawMessage `json:"body"`
			Result   *struct {
				StatusCode int `json:"status_code"`
			} `json:"result"`
		}
		_ = json.Unmarshal(raw, &j)
		if j.Tenant != "tb" || j.TenantID != tbID || j.Status != "succeeded" || !strings.Contains(string(j.Body), `"messages"`) || j.Result == nil || j.Result.StatusCode != 200 {
			t.Fatalf("tb's job as an admin reads it: %s", raw)
		}
		resp, raw = adminCall(t, env, "POST", "/admin/v1/jobs/"+jb[0]+"/cancel", nil)
		wantCode(t, "cancel an ended job", resp, raw, 409, "job_already_ended")
	})

	t.Run("batches and files", func(t *testing.T) {
		resp, raw := adminCall(t, env, "GET", "/admin/v1/batches?tenant=ta", nil)
		wantCode(t, "ta's batches", resp, raw, 200, "")
		if strings.Contains(string(raw), batch.ID) {
			t.Fatalf("tb's batch listed for ta: %s", raw)
		}
		resp, raw = adminCall(t, env, "GET", "/admin/v1/batches?tenant=tb&status=completed", nil)
		if resp.StatusCode != 200 || !strings.Contains(string(raw), `"id":"`+batch.ID+`"`) || !strings.Contains(string(raw), `"tenant":"tb"`) {
			t.Fatalf("tb's completed batches: %d %s", resp.StatusCode, raw)
		}
		for _, c := range []struct{ query, code string }{{"status=done", "invalid_status"}, {"after=batch_x", "invalid_cursor"}, {"limit=-1", "invalid_limit"}} {
			resp, raw := adminCall(t, env, "GET", "/admin/v1/batches?"+c.query, nil)
			wantCode(t, "batches?"+c.query, resp, raw, 400, c.code)
		}
		for _, id := range []string{"garbage", "batch_" + uuid.NewString(), strings.TrimPrefix(batch.ID, "batch_"), "job_" + strings.TrimPrefix(batch.ID, "batch_")} {
			resp, raw := adminCall(t, env, "GET", "/admin/v1/batches/"+id, nil)
			wantCode(t, "batch "+id, resp, raw, 404, "batch_not_found")
			resp, raw = adminCall(t, env, "POST", "/admin/v1/batches/"+id+"/cancel", nil)
			wantCode(t, "cancel batch "+id, resp, raw, 404, "batch_not_found")
		}
		resp, raw = adminCall(t, env, "POST", "/admin/v1/batches/"+batch.ID+"/cancel", nil)
		if resp.StatusCode != 200 || !strings.Contains(string(raw), `"status":"completed"`) {
			t.Fatalf("cancel a completed batch: %d %s", resp.StatusCode, raw)
		}
		for _, id := range []string{"garbage", "file-" + uuid.NewString(), strings.TrimPrefix(file, "file-")} {
			for _, suffix := range []string{"", "/content"} {
				resp, raw := adminCall(t, env, "GET", "/admin/v1/files/"+id+suffix, nil)
				wantCode(t, "file "+id+suffix, resp, raw, 404, "file_not_found")
			}
		}
		// The output as the admin downloads it is the tenant's own.
		_, own := call(t, env.BaseURL, "/v1/files/"+finished.OutputFileID+"/content", kb.Secret, nil)
		resp, got := adminCall(t, env, "GET", "/admin/v1/files/"+finished.OutputFileID+"/content", nil)
		if resp.StatusCode != 200 || string(got) != string(own) || strings.Count(string(got), "\n") != 5 ||
			!strings.Contains(resp.Header.Get("Content-Disposition"), "_output.jsonl") {
			t.Fatalf("the output as an admin reads it: %d %q, headers %v", resp.StatusCode, got, resp.Header)
		}
		resp, raw = adminCall(t, env, "GET", "/admin/v1/files/"+file, nil)
		if resp.StatusCode != 200 || !strings.Contains(string(raw), `"tenant_id":"`+tbID+`"`) || !strings.Contains(string(raw), `"lines":5`) {
			t.Fatalf("the input file: %d %s", resp.StatusCode, raw)
		}
	})

	t.Run("capacity", func(t *testing.T) {
		resp, raw := adminCall(t, env, "GET", "/admin/v1/capacity", nil)
		wantCode(t, "capacity", resp, raw, 200, "")
		var c struct {
			Deployments []struct {
				Name              string `json:"name"`
				TPMLimit          int64  `json:"tpm_limit"`
				HeadroomTokens    int64  `json:"headroom_tokens"`
				ChargedBackground int64  `json:"charged_background_tokens"`
			} `json:"deployments"`
			Models []struct {
				Name   string `json:"name"`
				Queues []struct {
					Priority string `json:"priority"`
				} `json:"queues"`
			} `json:"models"`
		}
		if err := json.Unmarshal(raw, &c); err != nil {
			t.Fatal(err)
		}
		var names []string
		var background int64
		for _, d := range c.Deployments {
			names = append(names, d.Name)
			background += d.ChargedBackground
			if d.TPMLimit <= 0 || d.HeadroomTokens > d.TPMLimit {
				t.Fatalf("deployment %s: %s", d.Name, raw)
			}
		}
		if strings.Join(names, ",") != "gpt-4o-ptu,gpt-4o-standard,text-embedding-3-small" || background == 0 {
			t.Fatalf("deployments %v, background tokens %d: %s", names, background, raw)
		}
		for _, m := range c.Models {
			var prios []string
			for _, q := range m.Queues {
				prios = append(prios, q.Priority)
			}
			if strings.Join(prios, ",") != "normal,low,batch" {
				t.Fatalf("model %s queues %v", m.Name, prios)
			}
		}
	})

	t.Run("spend", func(t *testing.T) {
		type spend struct {
			Data []struct {
				Scope       string  `json:"scope"`
				KeyName     *string `json:"key_name"`
				PeriodStart int64   `json:"period_start"`
				PeriodEnd   int64   `json:"period_end"`
				SpentTokens int64   `json:"spent_tokens"`
				Budget      struct {
					Tokens int64 `json:"tokens"`
				} `json:"budget"`
			} `json:"data"`
		}
		var s spend
		// A process loads a budget within a second of its change and
		// writes spend every half second: call until the spend shows.
		harness.Eventually(t, 15*time.Second, "ta's key's spend to be written", func() bool {
			resp, raw := call(t, env.BaseURL, "/v1/chat/completions", ka.Secret, chat(5))
			wantCode(t, "a call of ta's key", resp, raw, 200, "")
			resp, raw = adminCall(t, env, "GET", "/admin/v1/tenants/ta/spend", nil)
			wantCode(t, "ta's spend", resp, raw, 200, "")
			s = spend{}
			_ = json.Unmarshal(raw, &s)
			return len(s.Data) == 2 && s.Data[1].SpentTokens > 0
		})
		now := time.Now().Unix()
		if s.Data[0].Scope != "tenant" || s.Data[0].Budget.Tokens != 5_000_000 || s.Data[1].Scope != "key" || deref(s.Data[1].KeyName) != "a-key" ||
			s.Data[0].PeriodStart > now || s.Data[0].PeriodEnd <= now {
			t.Fatalf("ta's spend: %+v", s)
		}
		resp, raw := adminCall(t, env, "GET", "/admin/v1/tenants/tb/spend", nil)
		if resp.StatusCode != 200 || !strings.Contains(string(raw), `"data":[]`) {
			t.Fatalf("tb's spend shows another tenant's budgets: %s", raw)
		}
		resp, raw = adminCall(t, env, "GET", "/admin/v1/tenants/"+url.PathEscape(strings.Repeat("n", 3000))+"/spend", nil)
		wantCode(t, "an unknown tenant's spend", resp, raw, 404, "tenant_not_found")
		// A revoked key's budget is no longer listed.
		resp, raw = adminCall(t, env, "POST", "/admin/v1/keys/"+ka.ID+"/revoke", nil)
		wantCode(t, "revoke", resp, raw, 200, "")
		resp, raw = adminCall(t, env, "GET", "/admin/v1/tenants/ta/spend", nil)
		if resp.StatusCode != 200 || strings.Contains(string(raw), "a-key") {
			t.Fatalf("a revoked key's budget is listed: %s", raw)
		}
	})

	t.Run("settings", func(t *testing.T) {
		resp, raw := adminCall(t, env, "GET", "/admin/v1/settings", nil)
		if resp.StatusCode != 200 || !strings.Contains(string(raw), `"models":["gpt-4o","text-embedding-3-small"]`) ||
			!strings.Contains(string(raw), `"job_priorities":["normal","low","batch"]`) {
			t.Fatalf("settings: %d %s", resp.StatusCode, raw)
		}
	})
}
