/**
 * The one thing the widget keeps in the browser: the visitor token, under
 * `hafen-widget:<widget id>` as JSON `{"token": …}`.
 *
 * Nothing is written before the visitor opens the chat (no consent banner is needed for a
 * widget that was only looked at); reading at load is what lets the launcher offer to continue
 * a chat. The token lives in sessionStorage, so it goes with the tab: WidgetConfig does not
 * say how long a visit lives, and a chat left open on a shared computer should not be found by
 * the next person. The cursor of the live stream stays in memory: after a reload the page's
 * DOM is new, so the chat is replayed from its start anyway.
 *
 * Storage may be missing or refuse access (privacy modes, sandboxed frames, a full quota);
 * then the chat still works for the life of the page.
 */

export interface Stored {
  token: string;
}

function key(widgetId: string): string {
  return `hafen-widget:${widgetId}`;
}

function storage(): Storage | null {
  try {
    return window.sessionStorage;
  } catch {
    return null;
  }
}

export function readStored(widgetId: string): Stored | null {
  try {
    const raw = storage()?.getItem(key(widgetId));
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

export function writeStored(widgetId: string, stored: Stored): void {
  try {
    storage()?.setItem(key(widgetId), JSON.stringify(stored));
  } catch {
    // See the module comment: the chat goes on without surviving a reload.
  }
}

export function forgetStored(widgetId: string): void {
  try {
    storage()?.removeItem(key(widgetId));
  } catch {
    // Nothing could have been written either.
  }
}
