package config

import (
	"reflect"
	"strings"
)

// Reloadable names what a running process takes from a new file on reload
// (SIGHUP): deployments, models (aliases and their policies), prices, and
// the circuit settings of deployments added from then on.
var Reloadable = []string{"deployments", "models", "pricing.prices", "circuit"}

// RestartOnly lists the settings that differ between a running config and
// a new one but take effect only at the next start (the listen address,
// the database, NATS, worker pool sizes…), as their YAML paths.
func RestartOnly(running, next *Config) []string {
	a, b := *running, *next
	a.Deployments, b.Deployments = nil, nil
	a.Models, b.Models = nil, nil
	a.Pricing.Prices, b.Pricing.Prices = nil, nil
	a.Circuit, b.Circuit = Circuit{}, Circuit{}
	// The per-deployment sync_reserve comes from worker.sync_reserve
	// when unset, and deployments are reloaded; so are the bounds of
	// automatic reserves, which the broker reads with them.
	a.Worker.SyncReserve, b.Worker.SyncReserve = 0, 0
	a.Worker.SyncReserveFloor, b.Worker.SyncReserveFloor = 0, 0
	a.Worker.SyncReserveCap, b.Worker.SyncReserveCap = 0, 0
	var out []string
	diff(reflect.ValueOf(a), reflect.ValueOf(b), "", &out)
	return out
}

// diff appends the YAML path of every field that differs, descending into
// structs.
func diff(a, b reflect.Value, prefix string, out *[]string) {
	t := a.Type()
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name := strings.Split(f.Tag.Get("yaml"), ",")[0]
		if name == "" || name == "-" {
			name = strings.ToLower(f.Name)
		}
		path := prefix + name
		av, bv := a.Field(i), b.Field(i)
		if f.Type.Kind() == reflect.Struct && f.Type.NumField() > 0 && f.Type.PkgPath() == t.PkgPath() {
			diff(av, bv, path+".", out)
			continue
		}
		if !reflect.DeepEqual(av.Interface(), bv.Interface()) {
			*out = append(*out, path)
		}
	}
}
