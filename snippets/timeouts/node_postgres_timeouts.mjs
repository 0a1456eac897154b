// A node-postgres pool for one function instance, with a limit on every database wait.
//
// The limits fit a function timeout of 10 seconds: getting a client waits at most
// CONNECTION_TIMEOUT_MILLIS, opening the connection included, and each statement runs at
// most STATEMENT_TIMEOUT_MILLIS.
import pg from "pg";

export const CONNECTION_TIMEOUT_MILLIS = 3000;
export const STATEMENT_TIMEOUT_MILLIS = 3000;
// Probe a connection that carried nothing for 2 s. node-postgres has no setting for the
// interval between probes or their number, so those stay at the operating system's values.
export const KEEPALIVE_INITIAL_DELAY_MILLIS = 2000;

const URL_FORM = "postgresql://USER:PASSWORD@HOST:26257/DATABASE?sslmode=verify-full";

let pool;

function readDatabaseUrl() {
  const connectionString = process.env.DATABASE_URL;
  if (!connectionString) {
    throw new Error(
      `DATABASE_URL is not set; set it to your cluster's connection string, ${URL_FORM}`,
    );
  }
  try {
    return { connectionString, url: new URL(connectionString) };
  } catch {
    // The URL parser's error keeps the input, password included, so it is not passed on.
    throw new Error(`DATABASE_URL is not a valid URL; use the form ${URL_FORM}`);
  }
}

// node-postgres ignores libpq's connect_timeout URL parameter, so the pool applies it here.
function connectionTimeoutMillis(url) {
  const seconds = url.searchParams.get("connect_timeout");
  if (seconds === null) {
    return CONNECTION_TIMEOUT_MILLIS;
  }
  const value = Number(seconds);
  if (!Number.isInteger(value) || value <= 0) {
    throw new Error(
      `DATABASE_URL has connect_timeout=${seconds}; set it to a whole number of seconds above 0`,
    );
  }
  return value * 1000;
}

// A statement_timeout parameter in the URL overrides the pool's own value, because
// node-postgres applies the URL's parameters last. One inside the URL's options would be
// sent next to the pool's value, so the pool then leaves its own out.
function statementTimeoutInOptions(url) {
  return (url.searchParams.get("options") ?? "").includes("statement_timeout");
}

function createPool() {
  const { connectionString, url } = readDatabaseUrl();
  const created = new pg.Pool({
    connectionString,
    // An instance handles one request at a time, so a second connection would sit unused.
    max: 1,
    maxLifetimeSeconds: 1800,
    // 0 turns off the idle timer (default 10 s): a frozen instance runs no timers, and one
    // firing at thaw would close the connection that the next request is about to use.
    idleTimeoutMillis: 0,
    // Bounds both opening a connection and waiting for the pool's one client.
    connectionTimeoutMillis: connectionTimeoutMillis(url),
    keepAlive: true,
    keepAliveInitialDelayMillis: KEEPALIVE_INITIAL_DELAY_MILLIS,
    ...(statementTimeoutInOptions(url) ? {} : { statement_timeout: STATEMENT_TIMEOUT_MILLIS }),
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

// Runs one statement and returns its rows. The pool destroys the client when the statement
// fails, so a statement timeout (error.code "57014") costs a new connection next time.
export async function query(text, values = []) {
  const result = await getPool().query(text, values);
  return result.rows;
}
