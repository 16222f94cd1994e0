package broker

import (
	"sync"
	"time"
)

// circuit stops calls to a deployment that keeps failing and lets one probe
// through after a cool-down; the cool-down doubles while probes fail.
type circuit struct {
	mu        sync.Mutex
	threshold int
	base, cap time.Duration

	failures  int
	open      bool
	openUntil time.Time
	openFor   time.Duration
	probing   bool
}

func newCircuit(threshold int, base, maxOpen time.Duration) *circuit {
	return &circuit{threshold: threshold, base: base, cap: maxOpen, openFor: base}
}

// ready reports, without side effects, whether a call could be let through.
func (c *circuit) ready(now time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return !c.open || (!c.probing && !now.Before(c.openUntil))
}

// acquire lets a call through; on an open circuit past its cool-down, only
// one probe at a time. probe is true when the call is that probe.
func (c *circuit) acquire(now time.Time) (ok, probe bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.open {
		return true, false
	}
	if c.probing || now.Before(c.openUntil) {
		return false, false
	}
	c.probing = true
	return true, true
}

// success closes the circuit.
func (c *circuit) success() {
	c.mu.Lock()
	c.failures, c.open, c.probing, c.openFor = 0, false, false, c.base
	c.mu.Unlock()
}

// failure counts a failed call; a failed probe reopens with a longer cool-down.
func (c *circuit) failure(now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.open {
		if c.probing {
			c.probing = false
			c.openFor = min(c.openFor*2, c.cap)
			c.openUntil = now.Add(c.openFor)
		}
		return
	}
	c.failures++
	if c.failures >= c.threshold {
		c.open, c.openUntil = true, now.Add(c.openFor)
	}
}

// abandon ends a probe that reached no verdict (the client went away).
func (c *circuit) abandon(probe bool) {
	if !probe {
		return
	}
	c.mu.Lock()
	c.probing = false
	c.mu.Unlock()
}

// isOpen is for metrics.
func (c *circuit) isOpen() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.open
}
