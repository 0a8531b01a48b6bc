// The Moleculer peer of benchmarks/bench_http.py: `node peer.js service NATS_URL` runs a
// `data` service answering `data.get` from memory; `node peer.js gateway NATS_URL PORT` runs
// moleculer-web with POST /v1/data/get -> data.get. Both talk over the NATS transporter.
"use strict";
const { ServiceBroker, Errors } = require("moleculer");
const ApiGateway = require("moleculer-web");

const [role, natsUrl, port] = process.argv.slice(2);
const broker = new ServiceBroker({
  nodeID: `bench-${role}-${process.pid}`,
  transporter: natsUrl,
  logger: false,
  metrics: false,
  tracing: false,
});

if (role === "service") {
  const store = new Map([["bench.hot", { n: 1, s: "x".repeat(256) }]]);
  broker.createService({
    name: "data",
    actions: {
      get(ctx) {
        const value = store.get(ctx.params.key);
        if (value === undefined) {
          throw new Errors.MoleculerClientError("not found", 404, "not_found");
        }
        return { key: ctx.params.key, value, revision: 1 };
      },
    },
  });
} else {
  broker.createService({
    name: "api",
    mixins: [ApiGateway],
    settings: {
      port: Number(port),
      ip: "127.0.0.1",
      logRequest: null,
      logResponse: null,
      log4XXResponses: false,
      routes: [
        {
          path: "/v1",
          mappingPolicy: "restrict",
          aliases: { "POST data/get": "data.get" },
          bodyParsers: { json: true },
          logging: false,
        },
      ],
    },
  });
}

broker.start();
