/**
 * The one thing the widget keeps in the browser: the visitor token, under
 * `hafen-widget:<widget id>` as JSON `{"token": …}`, in exactly one of sessionStorage and
 * localStorage.
 *
 * Nothing is written before the visitor opens the chat (no consent banner is needed for a
 * widget that was only looked at); reading at load is what lets the launcher offer to continue
 * a chat. By default the token lives in sessionStorage, so it goes with the tab, and a chat
 * left open on a shared computer is not found by the next person. Only when the widget
 * remembers visitors and the visitor has granted consent (where the dialog says so) is it
 * `persistent`, in localStorage, for a return visit within the visit lifetime; the server ends
 * the visit after that, and its token with it. The cursor of the live stream stays in memory:
 * after a reload the page's DOM is new, so the chat is replayed from its start anyway.
 *
 * Storage may be missing or refuse access (privacy modes, sandboxed frames, a full quota);
 * then the chat still works for the life of the page.
 */

export interface Stored {
  token: string;
}

type Kind = "sessionStorage" | "localStorage";

function key(widgetId: string): string {
  return `hafen-widget:${widgetId}`;
}

/** The storage, or null where even touching it throws. */
function storage(kind: Kind): Storage | null {
  try {
    return window[kind];
  } catch {
    return null;
  }
}

function read(kind: Kind, widgetId: string): Stored | null {
  try {
    const raw = storage(kind)?.getItem(key(widgetId));
    if (!raw) {
      return null;
    }
    const value: unknown = JSON.parse(raw);
    if (
      typeof value === "object" &&
      value !== null &&
      "token" in value &&
      typeof value.token === "string" &&
      value.token !== ""
    ) {
      return { token: value.token };
    }
  } catch {
    // Unreadable or not ours: as if nothing were stored.
  }
  return null;
}

/** Whether the write took. */
function write(kind: Kind, widgetId: string, stored: Stored): boolean {
  try {
    const target = storage(kind);
    target?.setItem(key(widgetId), JSON.stringify(stored));
    return target !== null;
  } catch {
    return false;
  }
}

function remove(kind: Kind, widgetId: string): void {
  try {
    storage(kind)?.removeItem(key(widgetId));
  } catch {
    // Nothing could have been written there either.
  }
}

/** The stored visit: this tab's first, else one remembered on this device. */
export function readStored(widgetId: string): Stored | null {
  return read("sessionStorage", widgetId) ?? read("localStorage", widgetId);
}

/**
 * Keeps the visit in localStorage when `persistent`, else in sessionStorage, and takes it out
 * of the other. A token that is not to be remembered leaves localStorage even when
 * sessionStorage refuses it; one that is to be remembered stays in sessionStorage when
 * localStorage refuses it, so the tab keeps its chat at least.
 */
export function writeStored(widgetId: string, stored: Stored, persistent: boolean): void {
  if (!persistent) {
    write("sessionStorage", widgetId, stored);
    remove("localStorage", widgetId);
  } else if (write("localStorage", widgetId, stored)) {
    remove("sessionStorage", widgetId);
  } else {
    write("sessionStorage", widgetId, stored);
  }
}

export function forgetStored(widgetId: string): void {
  remove("sessionStorage", widgetId);
  remove("localStorage", widgetId);
}
