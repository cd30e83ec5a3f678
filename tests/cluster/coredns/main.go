// CoreDNS with only the plugins the test node needs: cluster names from the kubernetes
// plugin and no forwarder, so no lookup ever leaves the machine.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
)

// The order of the plugin chain, as in CoreDNS's plugin.cfg.
func init() {
	dnsserver.Directives = []string{
		"reload", "bind", "ready", "health", "errors", "log", "cache", "hosts", "kubernetes", "loop",
	}
}

func main() { coremain.Run() }
