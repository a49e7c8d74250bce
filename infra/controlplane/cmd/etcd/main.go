// Command etcd is the upstream etcd server. etcd's own server module carries
// local replace directives, so it cannot be `go install`ed; this wrapper calls
// its entry point instead.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
