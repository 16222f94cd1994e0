package batch

import (
	"testing"

	"github.com/levee-gw/levee/broker"
)

func TestEndpoint(t *testing.T) {
	for _, tc := range []struct {
		in   string
		op   broker.Op
		want string
		ok   bool
	}{
		{"/v1/chat/completions", broker.OpChat, "/v1/chat/completions", true},
		{"/chat/completions", broker.OpChat, "/v1/chat/completions", true},
		{"/v1/embeddings", broker.OpEmbeddings, "/v1/embeddings", true},
		{"/completions", broker.OpCompletions, "/v1/completions", true},
		{"/v1/responses", broker.OpResponses, "/v1/responses", true},
		{"/v1/responses/x", 0, "", false},
		{"", 0, "", false},
	} {
		op, got, ok := Endpoint(tc.in)
		if ok != tc.ok || got != tc.want || (ok && op != tc.op) {
			t.Errorf("%q: %v %q %v", tc.in, op, got, ok)
		}
	}
}
