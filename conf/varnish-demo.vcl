vcl 4.1;
# A minimal Varnish edge cache that accepts PURGE, for the purged demo and the integration tests
# (tests/varnish.py starts one varnishd per edge node with this file).
#
#   varnishd -F -j none -n /tmp/edge1 -a 127.0.0.1:6081 -f conf/varnish-demo.vcl -s malloc,32m
#   curl -X PURGE -H 'Host: en.wikipedia.org' http://127.0.0.1:6081/wiki/Main_Page   -> 200 Purged
#   curl http://127.0.0.1:6081/                                                    -> 503 (no origin)
#
# See which purges arrived (wall-clock arrival time, status, Host, URL):
#   varnishncsa -n /tmp/edge1 -q 'ReqMethod eq "PURGE"' -F '%{VSL:Timestamp:Start[1]}x %s %{Host}i %U%q'
# Count them:
#   varnishstat -n /tmp/edge1 -1 -f MAIN.n_purges

# No origin server: this cache only takes purges. Requests that would need a fetch get
# "503 Backend fetch failed". (`backend default none;` exists since Varnish 6.4.)
backend default none;

# Who may purge: only purged on this machine (127.0.0.1, ::1); other clients get 405.
acl purgers {
    "127.0.0.1";
    "::1";
}

sub vcl_recv {
    if (req.method == "PURGE") {
        if (client.ip !~ purgers) {
            return (synth(405, "Not allowed"));
        }
        # Drops the object (all its variants) stored under req.http.host + req.url, then answers
        # "200 Purged", whether or not an object was cached. MAIN.n_purges counts these.
        return (purge);
    }
    # Everything else goes through the built-in VCL (lookup, then a fetch from the backend).
}
