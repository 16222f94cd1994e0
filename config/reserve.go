package config

import (
	"fmt"
	"strconv"

	"gopkg.in/yaml.v3"
)

// SyncReserve is the share of a deployment's TPM and RPM queue workers leave
// free for synchronous calls: AutoReserve (`auto` in YAML, the default),
// which follows the synchronous demand the deployment is expected to see, or
// a fixed share in (0, 1). Zero means unset.
type SyncReserve float64

// AutoReserve is `sync_reserve: auto`.
const AutoReserve SyncReserve = -1

// Default bounds of an automatic reserve, as shares of a deployment's
// limits: the floor is what a deployment keeps free on a quiet night, the
// cap what a forecast may take from the workers at most.
const (
	DefaultSyncReserveFloor = 0.02
	DefaultSyncReserveCap   = 0.5
)

// Auto reports whether the reserve follows the synchronous demand.
func (r SyncReserve) Auto() bool { return r == AutoReserve }

func (r SyncReserve) String() string {
	if r.Auto() {
		return "auto"
	}
	return strconv.FormatFloat(float64(r), 'g', -1, 64)
}

// UnmarshalYAML reads `auto` or a number.
func (r *SyncReserve) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind == yaml.ScalarNode && n.Value == "auto" {
		*r = AutoReserve
		return nil
	}
	var f float64
	if err := n.Decode(&f); err != nil || f < 0 {
		return fmt.Errorf("line %d: sync_reserve: %q: want auto or a share in (0, 1)", n.Line, n.Value)
	}
	*r = SyncReserve(f)
	return nil
}

// MarshalYAML writes `auto` or the number.
func (r SyncReserve) MarshalYAML() (any, error) {
	if r.Auto() {
		return "auto", nil
	}
	return float64(r), nil
}

// valid reports whether r is auto or a share in (0, 1).
func (r SyncReserve) valid() bool { return r.Auto() || (r > 0 && r < 1) }
