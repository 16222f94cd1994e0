package store

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"
)

func TestGroupCommit(t *testing.T) {
	t.Run("each call gets its own result, batched under load", func(t *testing.T) {
		release := make(chan struct{})
		var mu sync.Mutex
		var sizes []int
		g := &groupCommit[int, int]{max: 64, limit: 1, timeout: time.Second,
			flush: func(_ context.Context, in []int) ([]int, error) {
				mu.Lock()
				first := len(sizes) == 0
				sizes = append(sizes, len(in))
				mu.Unlock()
				if first {
					<-release // hold the only flush while the others queue
				}
				out := make([]int, len(in))
				for i, v := range in {
					out[i] = v * 10
				}
				return out, nil
			}}
		const n = 100
		var wg sync.WaitGroup
		errs := make(chan error, n)
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				got, err := g.do(context.Background(), i)
				if err != nil || got != i*10 {
					errs <- errors.New("wrong result")
				}
			}()
			if i == 0 {
				waitFor(t, func() bool { mu.Lock(); defer mu.Unlock(); return len(sizes) == 1 })
			}
		}
		waitFor(t, func() bool { g.mu.Lock(); defer g.mu.Unlock(); return len(g.pending) == n-1 })
		close(release)
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		// 1 alone, then the 99 that waited in statements of at most 64.
		if len(sizes) != 3 || sizes[0] != 1 || sizes[1] != 64 || sizes[2] != 35 {
			t.Fatalf("flush sizes %v, want [1 64 35]", sizes)
		}
	})
	t.Run("a failed statement is retried call by call", func(t *testing.T) {
		release := make(chan struct{})
		var mu sync.Mutex
		calls := 0
		g := &groupCommit[int, int]{max: 64, limit: 1, timeout: time.Second,
			flush: func(_ context.Context, in []int) ([]int, error) {
				mu.Lock()
				calls++
				first := calls == 1
				mu.Unlock()
				if first {
					<-release
				}
				for _, v := range in {
					if v == 3 {
						return nil, errors.New("bad row")
					}
				}
				return in, nil
			}}
		var wg sync.WaitGroup
		results := make([]error, 6)
		for i := range 6 {
			wg.Add(1)
			go func() { defer wg.Done(); _, results[i] = g.do(context.Background(), i) }()
			if i == 0 {
				waitFor(t, func() bool { mu.Lock(); defer mu.Unlock(); return calls == 1 })
			}
		}
		waitFor(t, func() bool { g.mu.Lock(); defer g.mu.Unlock(); return len(g.pending) == 5 })
		close(release)
		wg.Wait()
		for i, err := range results {
			if (err != nil) != (i == 3) {
				t.Fatalf("call %d: %v", i, err)
			}
		}
	})
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
		time.Sleep(time.Millisecond)
	}
}

// A call whose caller gives up before its statement starts is not run.
func TestGroupCommitDropsCallsGivenUp(t *testing.T) {
	release := make(chan struct{})
	var mu sync.Mutex
	var ran []int
	g := &groupCommit[int, int]{max: 64, limit: 1, timeout: time.Second,
		flush: func(_ context.Context, in []int) ([]int, error) {
			mu.Lock()
			first := len(ran) == 0
			ran = append(ran, in...)
			mu.Unlock()
			if first {
				<-release
			}
			return in, nil
		}}
	go func() { _, _ = g.do(context.Background(), 0) }()
	waitFor(t, func() bool { mu.Lock(); defer mu.Unlock(); return len(ran) == 1 })
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { _, err := g.do(ctx, 1); errc <- err }()
	waitFor(t, func() bool { g.mu.Lock(); defer g.mu.Unlock(); return len(g.pending) == 1 })
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("a call given up while waiting: %v", err)
	}
	go func() {
		waitFor(t, func() bool { g.mu.Lock(); defer g.mu.Unlock(); return len(g.pending) == 1 })
		close(release)
	}()
	if _, err := g.do(context.Background(), 2); err != nil { // waits behind the held flush
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if slices.Contains(ran, 1) {
		t.Fatalf("the call given up ran: %v", ran)
	}
}

// Two calls of one key never share a statement.
func TestGroupCommitKeepsOneKeyPerStatement(t *testing.T) {
	release := make(chan struct{})
	var mu sync.Mutex
	var batches [][]int
	g := &groupCommit[int, int]{max: 64, limit: 1, timeout: time.Second, key: func(v int) any { return v % 3 },
		flush: func(_ context.Context, in []int) ([]int, error) {
			mu.Lock()
			first := len(batches) == 0
			batches = append(batches, slices.Clone(in))
			mu.Unlock()
			if first {
				<-release
			}
			return in, nil
		}}
	var wg sync.WaitGroup
	for i := range 7 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if got, err := g.do(context.Background(), i); err != nil || got != i {
				t.Errorf("call %d: %d %v", i, got, err)
			}
		}()
		if i == 0 {
			waitFor(t, func() bool { mu.Lock(); defer mu.Unlock(); return len(batches) == 1 })
		}
	}
	waitFor(t, func() bool { g.mu.Lock(); defer g.mu.Unlock(); return len(g.pending) == 6 })
	close(release)
	wg.Wait()
	for _, b := range batches {
		keys := map[int]bool{}
		for _, v := range b {
			if keys[v%3] {
				t.Fatalf("key %d twice in one statement: %v", v%3, batches)
			}
			keys[v%3] = true
		}
	}
	if len(batches) != 3 { // [0], then 1..6 as keys 1,2,0 and again 1,2,0
		t.Fatalf("statements %v, want 3", batches)
	}
}
