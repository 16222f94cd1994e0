package window

import (
	"testing"
	"time"
)

func TestWindow(t *testing.T) {
	const span = 2 * time.Second // 8 buckets of 250 ms, plus one kept
	type step struct {
		advance, add, value int64 // Advance(advance), then Add(add, value)
		total               int64
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"charges add up", []step{{10, 10, 5, 5}, {11, 11, 7, 12}, {12, 12, 1, 13}}},
		{"a charge lasts a whole span", []step{{10, 10, 5, 5}, {17, 17, 0, 5}, {18, 18, 0, 5}, {19, 19, 0, 0}}},
		{"a long silence clears everything", []step{{10, 10, 5, 5}, {11, 11, 3, 8}, {100, 100, 0, 0}}},
		{"an expired bucket is not charged", []step{{20, 10, 5, 0}, {20, 11, 5, 0}, {20, 12, 5, 5}}},
		{"a future bucket is not charged", []step{{10, 11, 5, 0}}},
		{"refunds take back", []step{{10, 10, 5, 5}, {12, 10, -5, 0}}},
		{"time going back changes nothing", []step{{10, 10, 5, 5}, {5, 10, 1, 6}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := New(span)
			for i, s := range tt.steps {
				w.Advance(s.advance)
				w.Add(s.add, s.value)
				if w.Total() != s.total {
					t.Fatalf("step %d: total %d, want %d", i, w.Total(), s.total)
				}
			}
		})
	}
}

func TestFreeAt(t *testing.T) {
	w := New(2 * time.Second)
	w.Advance(10)
	w.Add(10, 4)
	w.Advance(12)
	w.Add(12, 6)
	bucketTime := func(b int64) time.Time { return time.Unix(0, b*int64(Width)) }
	tests := []struct {
		target int64
		want   time.Time
	}{
		{10, time.Time{}},        // already there
		{6, bucketTime(10 + 9)},  // when bucket 10 leaves
		{0, bucketTime(12 + 9)},  // when both have
		{-1, bucketTime(12 + 9)}, // never lower than empty
	}
	for _, tt := range tests {
		if got := w.FreeAt(tt.target); !got.Equal(tt.want) {
			t.Errorf("FreeAt(%d) = %v, want %v", tt.target, got, tt.want)
		}
	}
}

func TestExpiring(t *testing.T) {
	w := New(2 * time.Second) // buckets 4..12 are in the window at 12
	w.Advance(10)
	w.Add(10, 4)
	w.Advance(12)
	w.Add(12, 6)
	for _, tt := range []struct {
		n    int
		want int64
	}{
		{0, 0}, {6, 0}, // buckets 4..9 hold nothing
		{7, 4},  // bucket 10 leaves within 7 buckets
		{9, 10}, // and bucket 12 within 9: everything
		{100, 10},
	} {
		if got := w.Expiring(tt.n); got != tt.want {
			t.Errorf("Expiring(%d) = %d, want %d", tt.n, got, tt.want)
		}
	}
}
