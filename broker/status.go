package broker

import (
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// CircuitOpen reports whether the deployment's circuit is open: calls are
// kept off it until a probe succeeds.
func (d *Deployment) CircuitOpen() bool { return d.circuit.isOpen() }

// Failovers returns, by deployment and then by reason ("429", "5xx",
// "error"), the calls this process moved off a deployment since it started:
// levee_upstream_failovers_total, read by collecting it, so no series is
// created and the call path is not touched.
func (b *Broker) Failovers() map[string]map[string]int64 {
	ch := make(chan prometheus.Metric, 16)
	go func() {
		b.metrics.failovers.Collect(ch)
		close(ch)
	}()
	out := map[string]map[string]int64{}
	for m := range ch {
		var pb dto.Metric
		if err := m.Write(&pb); err != nil {
			continue
		}
		var deployment, reason string
		for _, l := range pb.GetLabel() {
			switch l.GetName() {
			case "deployment":
				deployment = l.GetValue()
			case "reason":
				reason = l.GetValue()
			}
		}
		if out[deployment] == nil {
			out[deployment] = map[string]int64{}
		}
		out[deployment][reason] = int64(pb.GetCounter().GetValue())
	}
	return out
}
