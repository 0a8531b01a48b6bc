// Asks nexus-bus workers the NATS micro questions with the official JavaScript client
// (@nats-io/services), and prints what it parsed as one JSON document.
//   node srv_client.mjs <nats-url> <service-name> [<service-id>]
import { connect } from "@nats-io/transport-node";
import { Svcm } from "@nats-io/services";

const [url, name, id] = process.argv.slice(2);
const nc = await connect({ servers: url });
const client = new Svcm(nc).client({ maxWait: 1000 });

async function collect(iterator) {
  const found = [];
  for await (const item of await iterator) found.push(item);
  return found;
}

const result = {
  ping_all: await collect(client.ping()),
  ping: await collect(client.ping(name, id)),
  info: await collect(client.info(name, id)),
  stats: await collect(client.stats(name, id)),
};
await nc.close();
process.stdout.write(JSON.stringify(result));
