package broker

import (
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/levee-gw/levee/config"
)

// exactMinute is a deployment's own exact sliding minute, as Azure (and the
// simulator) keep it: what the scenarios judge utilization by.
type exactMinute struct {
	limit int64
	at    []time.Time
	tok   []int64
	sum   int64
}

func (u *exactMinute) prune(now time.Time) {
	i := 0
	for i < len(u.at) && !u.at[i].After(now.Add(-time.Minute)) {
		u.sum -= u.tok[i]
		i++
	}
	u.at, u.tok = u.at[i:], u.tok[i:]
}

func (u *exactMinute) charge(now time.Time, tok int64) bool {
	u.prune(now)
	if u.sum+tok > u.limit {
		return false
	}
	u.at, u.tok, u.sum = append(u.at, now), append(u.tok, tok), u.sum+tok
	return true
}

// scenario drives a broker with a provisioned 60k-TPM and a standard
// 120k-TPM deployment on a fake clock, in steps of 10 ms: Poisson
// synchronous calls at syncShare(t) of the total TPM, routed as Broker.Do
// routes them, and, from backlogFrom on, workers that poll every 20 ms and
// take what BackgroundSlots offers, as worker.Worker does. The deployments'
// own exact minutes judge it.
type scenario struct {
	syncShare   func(t time.Duration) float64
	backlogFrom time.Duration
	length      time.Duration
	measureFrom time.Duration
	reserve     config.SyncReserve // zero: the default
	// probe, when set, is called at every step with the broker.
	probe func(el time.Duration, b *Broker)
}

type scenarioResult struct {
	util, utilPTU, utilStd float64 // mean exact occupancy while measured
	syncCalls              int
	// refusedWithRoom counts synchronous calls refused while Levee's own
	// view had room for them on a deployment (a routing fault);
	// refusedExactRoom those refused while a deployment's exact minute
	// had room (Levee holds a charge up to one bucket longer than the
	// deployment).
	refusedWithRoom, refusedExactRoom int
	upstream429                       int // calls Levee sent that the deployment would refuse
	reserve                           map[string]float64
}

const (
	scenarioPTU, scenarioStd = 60_000, 120_000
	syncEst, jobEst          = 330, 430
)

func (s scenario) run(t *testing.T, seed uint64) scenarioResult {
	t.Helper()
	cfg := &config.Config{
		Deployments: []config.Deployment{
			{Name: "ptu", Model: "gpt-4o", Endpoint: "http://127.0.0.1:1", Credential: "k", Kind: config.Provisioned, TPM: scenarioPTU, SyncReserve: s.reserve},
			{Name: "std", Model: "gpt-4o", Endpoint: "http://127.0.0.1:1", Credential: "k", Kind: config.Standard, TPM: scenarioStd, SyncReserve: s.reserve},
		},
		Models: []config.Model{{Name: "gpt-4o", Deployments: []string{"ptu", "std"}}},
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	b := New(cfg, nil, nil, nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
	now := t0
	b.now = func() time.Time { return now }
	g, _ := b.Resolve("gpt-4o")
	exact := map[*Deployment]*exactMinute{}
	for _, d := range b.Deployments() {
		exact[d] = &exactMinute{limit: int64(d.TPM)}
	}
	rng := rand.New(rand.NewPCG(seed, 2))
	res := scenarioResult{reserve: map[string]float64{}}
	send := func(d *Deployment, r *Reservation, est int) {
		if !exact[d].charge(now, int64(est)) {
			res.upstream429++
		}
		r.Commit(0)
		d.circuit.success()
	}
	const step = 10 * time.Millisecond
	var occPTU, occStd, samples float64
	for el := time.Duration(0); el < s.length; el += step {
		now = t0.Add(el)
		rate := s.syncShare(el) * (scenarioPTU + scenarioStd) / 60 / syncEst // calls per second
		for n := poisson(rng, rate*step.Seconds()); n > 0; n-- {
			res.syncCalls++
			d, r, _, _ := b.pick(g, nil, func(*Deployment) int { return syncEst }, false)
			if d != nil {
				send(d, r, syncEst)
				continue
			}
			levee, ex := false, false
			for _, d := range b.Deployments() {
				tok, req := d.Capacity.Headroom(now)
				levee = levee || (tok >= syncEst && req >= 1)
				exact[d].prune(now)
				ex = ex || exact[d].sum+syncEst <= exact[d].limit
			}
			if levee {
				res.refusedWithRoom++
			}
			if ex {
				res.refusedExactRoom++
			}
		}
		if el >= s.backlogFrom && el%(20*time.Millisecond) == 0 {
			for n := g.BackgroundSlots(now, jobEst); n > 0; n-- {
				d, r, _, _ := b.pick(g, nil, func(*Deployment) int { return jobEst }, true)
				if d == nil {
					break
				}
				send(d, r, jobEst)
			}
		}
		if s.probe != nil {
			s.probe(el, b)
		}
		if el >= s.measureFrom && el%time.Second == 0 {
			for d, u := range exact {
				u.prune(now)
				occ := float64(u.sum) / float64(u.limit)
				if d.Kind == config.Provisioned {
					occPTU += occ
				} else {
					occStd += occ
				}
			}
			samples++
		}
	}
	res.utilPTU, res.utilStd = occPTU/samples, occStd/samples
	res.util = (res.utilPTU*scenarioPTU + res.utilStd*scenarioStd) / (scenarioPTU + scenarioStd)
	for _, d := range b.Deployments() {
		res.reserve[d.Name] = d.Capacity.SyncReserve(now)
	}
	return res
}

// poisson draws from a Poisson distribution of mean m (Knuth's method).
func poisson(rng *rand.Rand, m float64) int {
	l, n, p := math.Exp(-m), 0, rng.Float64()
	for p > l {
		n++
		p *= rng.Float64()
	}
	return n
}

// TestReserveScenarios runs the three scenarios of issue 13 on a fake
// clock with the default configuration (sync_reserve auto), each with three
// seeds of the synchronous arrivals, and the fixed 0.2 of before beside the
// steady one. The bench (make bench-levelling) runs them for real against
// the simulator.
func TestReserveScenarios(t *testing.T) {
	const floor = config.DefaultSyncReserveFloor
	steady := func(share float64) func(time.Duration) float64 {
		return func(time.Duration) float64 { return share }
	}
	spikeAt := 3 * time.Minute
	spike := func(el time.Duration) float64 {
		switch {
		case el < spikeAt:
			return 0.1
		case el < spikeAt+time.Second:
			return 0.1 + 0.7*float64(el-spikeAt)/float64(time.Second)
		}
		return 0.8
	}
	// In the spike, the forecast for the standard deployment (where the
	// calls beyond the provisioned one's room go) must see the spill
	// within seconds (its background pace gives way as it does).
	var risen time.Duration
	spikeProbe := func(el time.Duration, b *Broker) {
		d, _ := b.Deployment("std")
		d.Capacity.mu.Lock()
		tok := d.Capacity.routedTok
		d.Capacity.mu.Unlock()
		if risen == 0 && el > spikeAt && tok > 0.5*(0.8*(scenarioPTU+scenarioStd)-scenarioPTU)/60 {
			risen = el - spikeAt
		}
	}
	for _, tc := range []struct {
		name string
		s    scenario
		// the mean utilization over the seeds must reach minUtil (0: not
		// judged), and each seed's exact-room refusals stay within
		// maxExactRefused of the synchronous calls
		minUtil, maxExactRefused float64
		check                    func(t *testing.T, r scenarioResult)
	}{
		{"steady 40%", scenario{syncShare: steady(0.4), backlogFrom: time.Minute, length: 5 * time.Minute, measureFrom: 2 * time.Minute}, 0.97, 0, nil},
		{"spike 10% to 80%", scenario{syncShare: spike, backlogFrom: time.Minute, length: 6 * time.Minute, measureFrom: spikeAt, probe: spikeProbe}, 0.95, 0.01,
			func(t *testing.T, r scenarioResult) {
				if risen == 0 || risen > 10*time.Second {
					t.Errorf("the standard deployment's forecast saw the spill %v after the spike, want within 10 s", risen)
				}
				risen = 0
			}},
		{"night", scenario{syncShare: steady(0), backlogFrom: 0, length: 4 * time.Minute, measureFrom: 2 * time.Minute}, 0.975, 0,
			func(t *testing.T, r scenarioResult) {
				// The floor is kept where synchronous calls would end up:
				// the standard deployment; the provisioned one spills there.
				if r.reserve["std"] != floor || r.reserve["ptu"] != 0 {
					t.Errorf("reserves at night %v, want the floor (%v) on std and none on ptu", r.reserve, floor)
				}
			}},
		{"steady 40%, fixed 0.2", scenario{syncShare: steady(0.4), backlogFrom: time.Minute, length: 5 * time.Minute, measureFrom: 2 * time.Minute, reserve: 0.2}, 0, 0,
			func(t *testing.T, r scenarioResult) {
				if r.reserve["std"] != 0.2 || r.reserve["ptu"] != 0.2 {
					t.Errorf("fixed reserves %v, want 0.2", r.reserve)
				}
				if r.utilStd > 0.81 {
					t.Errorf("the standard deployment filled to %.1f%% past a fixed 20%% reserve", r.utilStd*100)
				}
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var util float64
			const seeds = 3
			for seed := uint64(1); seed <= seeds; seed++ {
				r := tc.s.run(t, seed)
				t.Logf("seed %d: utilization %.1f%% (ptu %.1f%%, std %.1f%%); sync calls %d, refused with room in Levee's view %d, in the deployments' %d; upstream 429s %d; reserve %v",
					seed, r.util*100, r.utilPTU*100, r.utilStd*100, r.syncCalls, r.refusedWithRoom, r.refusedExactRoom, r.upstream429, r.reserve)
				util += r.util / seeds
				if r.refusedWithRoom > 0 {
					t.Errorf("seed %d: %d synchronous calls refused while Levee saw room", seed, r.refusedWithRoom)
				}
				if float64(r.refusedExactRoom) > tc.maxExactRefused*float64(r.syncCalls) {
					t.Errorf("seed %d: %d of %d synchronous calls refused while a deployment had room", seed, r.refusedExactRoom, r.syncCalls)
				}
				if r.upstream429 > 0 {
					t.Errorf("seed %d: %d calls sent that the deployment refuses", seed, r.upstream429)
				}
				if tc.check != nil {
					tc.check(t, r)
				}
			}
			if util < tc.minUtil {
				t.Errorf("mean utilization %.1f%%, want ≥ %.1f%%", util*100, tc.minUtil*100)
			}
		})
	}
}
