// AWS Lambda handler (Node.js) that reaches CockroachDB only over TLS verified with the cluster's CA.
import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import pg from "pg";

// The CA certificate ships inside the deployment package, which Lambda unpacks into
// LAMBDA_TASK_ROOT. Outside Lambda the directory of this file is used instead.
const PACKAGE_ROOT =
  process.env.LAMBDA_TASK_ROOT || path.dirname(fileURLToPath(import.meta.url));
export const CA_CERTIFICATE = path.join(PACKAGE_ROOT, "certs", "root.crt");

const URL_EXAMPLE = "postgresql://USER:PASSWORD@HOST:26257/DATABASE";

// pg-connection-string builds an `ssl` object of its own from these parameters, and it
// replaces the `ssl` option passed to the pool: `sslmode=disable` turns TLS off, and
// `sslmode=verify-full` drops the CA given below. The URL therefore loses them.
const URL_TLS_PARAMETERS = ["ssl", "sslmode", "sslrootcert", "sslcert", "sslkey", "uselibpqcompat"];

// Module code runs once per execution environment, at its cold start. Node.js verifies
// the server's certificate with the OpenSSL it was built with.
console.log(`Node.js ${process.version}, OpenSSL ${process.versions.openssl}`);

let pool;

function connectionString() {
  const value = (process.env.DATABASE_URL ?? "").trim();
  if (!value) {
    throw new Error(
      `DATABASE_URL is not set: add the cluster's connection string (${URL_EXAMPLE}) ` +
        "to the function's environment",
    );
  }

  let url;
  try {
    url = new URL(value);
  } catch {
    // The parser's error carries the whole input, password included, so it is dropped.
    throw new Error(
      `DATABASE_URL is not a valid connection string: expected ${URL_EXAMPLE} with ` +
        "special characters in the user name and password percent-encoded",
    );
  }
  if (url.protocol !== "postgresql:" && url.protocol !== "postgres:") {
    throw new Error(`DATABASE_URL must start with postgresql://: expected ${URL_EXAMPLE}`);
  }
  if (!url.hostname) {
    throw new Error(`DATABASE_URL names no host: expected ${URL_EXAMPLE}`);
  }

  for (const name of URL_TLS_PARAMETERS) {
    url.searchParams.delete(name);
  }
  return url.toString();
}

function tlsOptions() {
  let ca;
  try {
    ca = readFileSync(CA_CERTIFICATE, "utf8");
  } catch (error) {
    if (error.code === "ENOENT") {
      throw new Error(
        `the cluster's CA certificate ${CA_CERTIFICATE} is missing: download it from the ` +
          "cluster's connection dialog and add it to the deployment package as certs/root.crt",
      );
    }
    throw error;
  }
  // Node.js checks the certificate against the URL's host name. It trusts only `ca`
  // here, not its bundled public CAs.
  return { ca, rejectUnauthorized: true };
}

export function getPool() {
  if (pool === undefined) {
    const created = new pg.Pool({
      connectionString: connectionString(),
      ssl: tlsOptions(),
      max: 1,
      maxLifetimeSeconds: 1800,
      connectionTimeoutMillis: 5000,
      idleTimeoutMillis: 0,
    });
    // Without a listener, an idle client's failed connection crashes the process.
    created.on("error", (error) => {
      console.error(`database pool: idle connection closed: ${error.message}`);
    });
    pool = created;
  }
  return pool;
}

// Returns the database's clock as a health check, read over a verified TLS connection.
export const handler = async () => {
  const result = await getPool().query("SELECT now() AS database_time");
  return {
    statusCode: 200,
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ database_time: result.rows[0].database_time }),
  };
};
