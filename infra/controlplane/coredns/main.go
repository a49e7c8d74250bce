// Command coredns is CoreDNS with only the plugins the test node's cluster DNS needs:
// names of Services and pods from the apiserver, no forwarder (pods get no route off the
// machine, so there is nothing upstream to ask).
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/ready"
)

// Directives in the order CoreDNS's plugin.cfg runs them.
var directives = []string{"bind", "ready", "health", "errors", "loadbalance", "cache", "kubernetes"}

func main() {
	dnsserver.Directives = directives
	coremain.Run()
}
