// Package window is the sliding sum every limit in Levee is kept in: a
// deployment's tokens per minute and requests per 10 s, and a tenant's or a
// key's tokens and requests per minute. Time is cut into buckets of Width;
// a charge is treated as expiring at the end of its bucket plus the span,
// so a window errs towards "full".
package window

import "time"

// Width is the width of a bucket.
const Width = 250 * time.Millisecond

// Window is a sliding sum over a fixed span, bucketed. The zero value is
// not usable; make one with New. It is not safe for concurrent use.
type Window struct {
	buckets []int64
	last    int64 // absolute index of the newest bucket
	total   int64
}

// New keeps one bucket more than the span needs, so a charge made at the
// very end of a bucket is held a full span (never expired early).
func New(span time.Duration) Window {
	return Window{buckets: make([]int64, int(span/Width)+1)}
}

// Bucket is the absolute index of the bucket holding t.
func Bucket(t time.Time) int64 { return t.UnixNano() / int64(Width) }

// Total is the sum over the window as of the last Advance.
func (w *Window) Total() int64 { return w.total }

// Last is the newest bucket.
func (w *Window) Last() int64 { return w.last }

// Advance expires buckets that have left the window by bucket now.
func (w *Window) Advance(now int64) {
	if now <= w.last {
		return
	}
	n := int64(len(w.buckets))
	if now-w.last >= n {
		clear(w.buckets)
		w.total = 0
	} else {
		for b := w.last + 1; b <= now; b++ {
			i := b % n
			w.total -= w.buckets[i]
			w.buckets[i] = 0
		}
	}
	w.last = now
}

// Add charges v in a bucket still inside the window; a bucket already
// expired (or not yet current) is ignored.
func (w *Window) Add(bucket, v int64) {
	n := int64(len(w.buckets))
	if bucket <= w.last-n || bucket > w.last {
		return
	}
	w.buckets[bucket%n] += v
	w.total += v
}

// Expiring is what leaves the window within the next n buckets, assuming
// nothing new arrives: the sum of its n oldest buckets.
func (w *Window) Expiring(n int) int64 {
	size := int64(len(w.buckets))
	var sum int64
	for b, i := w.last-size+1, 0; i < n && b <= w.last; b, i = b+1, i+1 {
		sum += w.buckets[((b%size)+size)%size]
	}
	return sum
}

// FreeAt returns the earliest time at which the total will have fallen to
// at most target, assuming nothing new arrives (zero if it already has).
func (w *Window) FreeAt(target int64) time.Time {
	if w.total <= target {
		return time.Time{}
	}
	n := int64(len(w.buckets))
	left := w.total
	for b := w.last - n + 1; b <= w.last; b++ {
		left -= w.buckets[b%n]
		if left <= target {
			return time.Unix(0, (b+n)*int64(Width))
		}
	}
	return time.Unix(0, (w.last+n)*int64(Width))
}
