// A node-postgres pool for one function instance: one connection, checked before each use.
import pg from "pg";

let pool;

function createPool() {
  const connectionString = process.env.DATABASE_URL;
  if (!connectionString) {
    throw new Error(
      "DATABASE_URL is not set. Set it to your cluster's connection string, " +
        "postgresql://USER:PASSWORD@HOST:26257/DATABASE?sslmode=verify-full",
    );
  }

  const created = new pg.Pool({
    connectionString,
    // An instance handles one request at a time, so a second connection would sit unused.
    max: 1,
    // pg-pool starts a timer per client. At 30 minutes it closes an idle client at once,
    // and a checked-out one when it is released.
    maxLifetimeSeconds: 1800,
    // A checkout fails after 5 s, whether it waits for a new connection or for the one client.
    connectionTimeoutMillis: 5000,
    // 0 turns off the idle timer, which by default closes a client idle for 10 s. A frozen
    // instance runs no timers, so one that fired at thaw could close the connection that
    // the next request is about to use.
    idleTimeoutMillis: 0,
  });

  // pg-pool emits 'error' when the connection of an idle client fails, for example when
  // the server ends it, and has already removed that client. Without a listener, Node.js
  // treats the event as an uncaught exception and the instance crashes.
  created.on("error", (error) => {
    console.error(`database pool: idle connection closed: ${error.message}`);
  });
  return created;
}

export function getPool() {
  if (pool === undefined) {
    pool = createPool();
  }
  return pool;
}

// A checked-out client has no pool listener, and an 'error' event without one crashes
// Node.js. The failure still reaches the caller through the query that it breaks.
function logClientError(error) {
  console.error(`database connection failed while checked out: ${error.message}`);
}

async function connect(pool) {
  const client = await pool.connect();
  client.on("error", logClientError);
  return client;
}

function release(client, error) {
  client.off("error", logClientError);
  // With an error, pg-pool destroys the client instead of keeping it for reuse.
  client.release(error);
}

// pg-pool hands out an idle client without testing it. If the server or the network
// closed that connection while the instance was frozen, the first query fails, so a
// cheap query tests it first and a broken client is replaced once.
// NOTE: a connection whose packets are dropped without a reset makes the test query wait
// until the kernel gives up retransmitting, which takes minutes.
async function checkOut(pool) {
  const client = await connect(pool);
  try {
    await client.query("SELECT 1");
    return client;
  } catch (error) {
    console.error(`database pool: replacing a broken connection: ${error.message}`);
    release(client, error);
  }
  // With max: 1 the broken client was the only one, so this opens a new connection.
  return connect(pool);
}

// Runs `work(client)` on a checked connection and always returns the client to the pool.
export async function withClient(work) {
  const client = await checkOut(getPool());
  let failure;
  try {
    return await work(client);
  } catch (error) {
    // The failure may come from a broken connection or leave a transaction open, so the
    // client is destroyed rather than handed to the next request.
    failure = error;
    throw error;
  } finally {
    release(client, failure);
  }
}
