// The PeerJS signaling server (npm package `peer`) the benchmark compares
// against, on 127.0.0.1 only. Started by bench/signaling_load.py:
//   node bench/peerjs_server.cjs PORT
// Defaults of `peer` 1.0.x except two limits the benchmark would hit:
// concurrent_limit (5000 peers) and alive_timeout (90 s without a HEARTBEAT
// message closes a peer; the benchmark's idle sockets send none).
"use strict";

const { PeerServer } = require("peer");

const port = Number(process.argv[2] || 9000);

PeerServer(
  {
    host: "127.0.0.1",
    port,
    path: "/",
    key: "peerjs",
    concurrent_limit: 100000,
    alive_timeout: 3600 * 1000,
  },
  () => {
    process.stdout.write(`peerjs listening on 127.0.0.1:${port}\n`);
  },
);

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => process.exit(0));
}
