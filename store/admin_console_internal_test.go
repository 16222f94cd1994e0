package store

import (
	"strings"
	"testing"
)

// The admin list drops the body and the result from jobColumns by
// rewriting it: a change to jobColumns that the rewrite no longer matches
// would silently bring megabytes back into every page.
func TestJobSummaryColumnsLeaveOutBodies(t *testing.T) {
	if n := strings.Count(jobSummaryColumns, "NULL::bytea"); n != 2 {
		t.Fatalf("jobSummaryColumns replaces %d columns, want body and result_body:\n%s", n, jobSummaryColumns)
	}
	if strings.Count(jobSummaryColumns, ",") != strings.Count(jobColumns, ",") {
		t.Fatalf("jobSummaryColumns has another number of columns than jobColumns:\n%s", jobSummaryColumns)
	}
}
