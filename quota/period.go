package quota

import (
	"time"

	"github.com/levee-gw/levee/store"
)

// Period returns the start and the end of b's period holding now (UTC): the
// span its spend is counted in, as the admin API shows it.
func Period(b store.Budget, now time.Time) (start, end time.Time) {
	return periodStart(b, now), nextPeriod(b, now)
}
