// The connection budget calculator of the pool sizing page.
//
// planConnections() is a pure function that returns the same numbers, messages and errors
// as plan_connections() in snippets/sizing/connection_budget.py; the tests run both on the
// same inputs. In Node.js the file exports it through module.exports. In the browser it
// wires every <form class="connection-budget"> on the page and does nothing elsewhere.
(function (root) {
  "use strict";

  const FIELDS = ["name", "max_concurrency", "pool_max"];
  // Keeps every total an exact integer, far below Number.MAX_SAFE_INTEGER.
  const MAX_COUNT = 1000000;

  class ConnectionBudgetError extends Error {
    constructor(field, value, message) {
      super(message);
      this.name = "ConnectionBudgetError";
      this.field = field;
      this.value = value;
    }
  }

  // Formats a rejected value as JSON, as the Python version does.
  function show(value) {
    const text = JSON.stringify(value);
    return text === undefined ? String(value) : text;
  }

  function checkCount(field, value, minimum) {
    if (typeof value !== "number" || !Number.isInteger(value)) {
      throw new ConnectionBudgetError(
        field,
        value,
        `${field} must be a whole number, got ${show(value)}`,
      );
    }
    if (value < minimum || value > MAX_COUNT) {
      throw new ConnectionBudgetError(
        field,
        value,
        `${field} must be between ${minimum} and ${MAX_COUNT}, got ${show(value)}`,
      );
    }
    return value;
  }

  function parseFunction(entry, position) {
    const where = `functions[${position}]`;
    if (typeof entry !== "object" || entry === null || Array.isArray(entry)) {
      throw new ConnectionBudgetError(
        where,
        entry,
        `${where} must be an object with the fields name, max_concurrency and pool_max, ` +
          `got ${show(entry)}`,
      );
    }

    for (const key of Object.keys(entry)) {
      if (!FIELDS.includes(key)) {
        throw new ConnectionBudgetError(
          `${where}.${key}`,
          entry[key],
          `${where}.${key} is not a known field (its value is ${show(entry[key])}); ` +
            "the fields are name, max_concurrency and pool_max",
        );
      }
    }
    for (const key of FIELDS) {
      if (!Object.hasOwn(entry, key)) {
        throw new ConnectionBudgetError(`${where}.${key}`, undefined, `${where}.${key} is missing`);
      }
    }

    const name = entry.name;
    if (typeof name !== "string" || name.trim() === "") {
      throw new ConnectionBudgetError(
        `${where}.name`,
        name,
        `${where}.name must be a non-empty string, got ${show(name)}`,
      );
    }
    const maxConcurrency = checkCount(`${where}.max_concurrency`, entry.max_concurrency, 1);
    const poolMax = checkCount(`${where}.pool_max`, entry.pool_max, 1);
    return {
      name,
      max_concurrency: maxConcurrency,
      pool_max: poolMax,
      connections: maxConcurrency * poolMax,
    };
  }

  function parseFunctions(functions) {
    if (!Array.isArray(functions)) {
      throw new ConnectionBudgetError(
        "functions",
        functions,
        `functions must be a list, got ${show(functions)}`,
      );
    }
    if (functions.length === 0) {
      throw new ConnectionBudgetError(
        "functions",
        functions,
        "functions is empty; list at least one function",
      );
    }

    const parsed = [];
    const firstPosition = new Map();
    functions.forEach((entry, position) => {
      const fn = parseFunction(entry, position);
      if (firstPosition.has(fn.name)) {
        throw new ConnectionBudgetError(
          `functions[${position}].name`,
          fn.name,
          `functions[${position}].name ${show(fn.name)} repeats ` +
            `functions[${firstPosition.get(fn.name)}].name; give each function a unique name`,
        );
      }
      firstPosition.set(fn.name, position);
      parsed.push(fn);
    });
    return parsed;
  }

  // Returns the smallest cut that fits, taken from the function that needs the most
  // connections. Returns null when no single function can shed the overflow and keep one
  // instance.
  function findCap(functions, overflow) {
    // Array.prototype.sort is stable, so of two functions that need as many, the first
    // listed wins, as in the Python version.
    const byNeed = [...functions].sort((a, b) => b.connections - a.connections);
    for (const fn of byNeed) {
      const allowed = Math.floor((fn.connections - overflow) / fn.pool_max);
      if (allowed >= 1) {
        return { function: fn.name, max_concurrency: allowed };
      }
    }
    return null;
  }

  function summarize(budget) {
    const need =
      `The functions and the reserved connections need ${budget.total} ` +
      `of ${budget.connection_limit} connections`;
    if (budget.fits) {
      return `${need}, leaving ${budget.headroom} free.`;
    }
    if (budget.cap === null) {
      return (
        `${need}, ${budget.overflow} too many, and capping the concurrency of one ` +
        "function cannot make them fit: lower the pool maximums, cap several " +
        "functions, or raise the connection limit."
      );
    }
    const current = budget.functions.find((fn) => fn.name === budget.cap.function);
    return (
      `${need}, ${budget.overflow} too many. Cap the maximum concurrency of ` +
      `${budget.cap.function} at ${budget.cap.max_concurrency} (now ${current.max_concurrency}).`
    );
  }

  // Each entry of `functions` has exactly the fields name, max_concurrency and pool_max,
  // and `reserved` counts the connections kept for everything else. Throws
  // ConnectionBudgetError naming the first invalid field and its value.
  function planConnections(functions, connectionLimit, reserved = 0) {
    const limit = checkCount("connection_limit", connectionLimit, 1);
    const kept = checkCount("reserved", reserved, 0);
    const parsed = parseFunctions(functions);

    const total = parsed.reduce((sum, fn) => sum + fn.connections, 0) + kept;
    const overflow = Math.max(0, total - limit);
    const budget = {
      functions: parsed,
      reserved: kept,
      connection_limit: limit,
      total,
      headroom: Math.max(0, limit - total),
      overflow,
      fits: overflow === 0,
      cap: overflow ? findCap(parsed, overflow) : null,
    };
    budget.summary = summarize(budget);
    return budget;
  }

  // NOTE: the tests run planConnections() in Node.js but never drive the form below,
  // which needs a browser.
  // The form: rows of name, max concurrency and pool max, a connection limit and a
  // reserved count. An empty field reaches planConnections() as missing, and text that
  // is not a number as the text itself, so the error message shows what was typed.
  function readNumber(input) {
    const text = input.value.trim();
    if (text === "") {
      return undefined;
    }
    const number = Number(text);
    return Number.isNaN(number) ? text : number;
  }

  function readFunctions(form) {
    const functions = [];
    for (const row of form.querySelectorAll("[data-function]")) {
      const name = row.querySelector("[name=name]").value.trim();
      const concurrency = readNumber(row.querySelector("[name=max_concurrency]"));
      const poolMax = readNumber(row.querySelector("[name=pool_max]"));
      if (name === "" && concurrency === undefined && poolMax === undefined) {
        continue;
      }
      const entry = { name };
      if (concurrency !== undefined) {
        entry.max_concurrency = concurrency;
      }
      if (poolMax !== undefined) {
        entry.pool_max = poolMax;
      }
      functions.push(entry);
    }
    return functions;
  }

  function render(form) {
    const output = form.querySelector("output");
    const table = form.querySelector("[data-breakdown]");
    table.replaceChildren();
    try {
      const budget = planConnections(
        readFunctions(form),
        readNumber(form.elements.connection_limit),
        readNumber(form.elements.reserved) ?? 0,
      );
      for (const fn of budget.functions) {
        const row = table.insertRow();
        row.insertCell().textContent = fn.name;
        row.insertCell().textContent = `${fn.max_concurrency} × ${fn.pool_max}`;
        row.insertCell().textContent = String(fn.connections);
      }
      output.textContent = budget.summary;
      output.dataset.fits = String(budget.fits);
    } catch (error) {
      if (!(error instanceof ConnectionBudgetError)) {
        throw error;
      }
      output.textContent = error.message;
      output.dataset.fits = "invalid";
    }
  }

  function attach(form) {
    const template = form.querySelector("[data-function]");
    form.addEventListener("input", () => render(form));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      render(form);
    });
    form.querySelector("[data-add-function]").addEventListener("click", () => {
      const row = template.cloneNode(true);
      for (const input of row.querySelectorAll("input")) {
        input.value = "";
      }
      template.parentNode.appendChild(row);
    });
    render(form);
  }

  const api = { ConnectionBudgetError, MAX_COUNT, planConnections };
  if (typeof module === "object" && module.exports) {
    module.exports = api;
    return;
  }
  root.connectionBudget = api;

  function attachAll() {
    document.querySelectorAll("form.connection-budget").forEach(attach);
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", attachAll);
  } else {
    attachAll();
  }
})(typeof window === "undefined" ? globalThis : window);
