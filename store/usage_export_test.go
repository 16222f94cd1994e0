package store_test

import (
	"slices"
	"testing"

	"github.com/levee-gw/levee/store"
)

func TestCSVCells(t *testing.T) {
	for _, c := range []struct{ in, want []string }{
		{[]string{"=HYPERLINK(\"x\")", "ci", "12", "0.5"}, []string{"'=HYPERLINK(\"x\")", "ci", "12", "0.5"}},
		{[]string{"+1", "-1", "@sum", "\tx", "\rx", ""}, []string{"'+1", "'-1", "'@sum", "'\tx", "'\rx", ""}},
	} {
		if got := store.CSVCells(slices.Clone(c.in)); !slices.Equal(got, c.want) {
			t.Errorf("%q: %q, want %q", c.in, got, c.want)
		}
	}
}
