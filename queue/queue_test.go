package queue

import (
	"testing"

	"github.com/google/uuid"
)

func TestSubjects(t *testing.T) {
	q := &Queue{prefix: "levee.jobs.levee_jobs"}
	tenant := uuid.New()
	for _, model := range []string{"gpt-4o", "gpt-4.1-mini", "my model*>", "a.b.c"} {
		subj := q.Subject("low", model, tenant)
		prio, tok, got, ok := q.ParseSubject(subj)
		if !ok || prio != "low" || tok != Token(model) || got != tenant {
			t.Fatalf("%s: %q %q %v %v", model, prio, tok, got, ok)
		}
		if tok != Token(tok) {
			t.Fatalf("token %q is not stable", tok)
		}
	}
	for _, bad := range []string{"levee.jobs.levee_jobs.low.m", "other.low.m." + tenant.String(), "levee.jobs.levee_jobs.low.m.not-a-uuid"} {
		if _, _, _, ok := q.ParseSubject(bad); ok {
			t.Fatalf("%s parsed", bad)
		}
	}
}
